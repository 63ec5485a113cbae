"""latent_cache.manifest: a new manifest records its spec, and every check of a manifest against a
spec (settings, encoders and shapes, a reader's fingerprints) refuses with the input and the rule."""

import dataclasses

import pytest

from latent_cache import manifest as manifests
from latent_cache.manifest import CacheMismatchError
from latent_cache.spec import CacheSpec, EncoderWeights

SPEC = CacheSpec(flavor="tiny", resolution=128, text_mode="tokens", semantic=EncoderWeights(), text_encoder=EncoderWeights())
ENCODERS = {"semantic_compressor": {"fingerprint": "s1", "weights": "a.pt"}, "text_encoder": {"fingerprint": "t1"}}


def test_a_new_manifest_records_the_spec_its_shapes_and_its_waves():
    manifest = manifests.new_manifest(SPEC, ENCODERS, 32, {"source": {"url": "/data", "format": "folder"}})
    assert (manifest["flavor"], manifest["resolution"], manifest["bucket"], manifest["text_mode"]) == ("tiny", 128, "128x128", "tokens")
    assert manifest["shapes"] == {"stage_c_latents": [16, 3, 3], "text_tokens": [77], "text_mask": [77]}
    assert manifest["source"] == {"url": "/data", "format": "folder"}
    manifests.check_settings(manifest, SPEC, "c")
    manifests.check_encoders(manifest, SPEC, ENCODERS, 32, "c")
    for shard, (rows_in, written) in {"a": (5, 3), "b": (4, 4)}.items():
        stats = {"rows_in": rows_in, "rows_written": written, "dropped": {"too_small": rows_in - written}}
        manifests.record_wave(manifest, {shard: stats}, [{"path": f"data/{shard}.parquet", "rows": written}])
    assert (manifest["rows_in"], manifest["rows_written"], manifest["dropped"]) == (9, 7, {"too_small": 2})
    assert list(manifest["shards"]) == ["a", "b"] and len(manifest["files"]) == 2


def test_other_settings_encoders_or_shapes_are_refused():
    manifest = manifests.new_manifest(SPEC, ENCODERS, 32, {})
    with pytest.raises(CacheMismatchError, match=r"at c was made with resolution=128; this run has resolution=256"):
        manifests.check_settings(manifest, dataclasses.replace(SPEC, resolution=256), "c")
    with pytest.raises(CacheMismatchError, match="text_encoder of fingerprint t1, this run's has t2: appending would mix"):
        manifests.check_encoders(manifest, SPEC, {**ENCODERS, "text_encoder": {"fingerprint": "t2"}}, 32, "c")
    with pytest.raises(CacheMismatchError, match=r"has tensor shapes .*, this run .*stage_a_latents"):
        manifests.check_encoders(manifest, dataclasses.replace(SPEC, stage_a=EncoderWeights()), ENCODERS, 32, "c")


def test_a_reader_with_other_encoders_is_refused():
    manifest = manifests.new_manifest(SPEC, ENCODERS, 32, {})
    manifests.check_fingerprints(manifest, {"semantic_compressor": "s1"}, "c")
    with pytest.raises(CacheMismatchError, match=r"has no stage_a_latents column \(Stage A latents\): it was made with the "
                                                 r"encoders \['semantic_compressor', 'text_encoder'\], without a stage_a. .*encode.stage_a set"):
        manifests.check_fingerprints(manifest, {"stage_a": "x"}, "c")
    with pytest.raises(CacheMismatchError, match=r"semantic_compressor of fingerprint s1 \(a.pt\), but .* has fingerprint s2"):
        manifests.check_fingerprints(manifest, {"semantic_compressor": "s2"}, "c")


def test_a_cache_with_the_decoder_text_records_its_shape_from_that_encoder_width():
    spec = dataclasses.replace(SPEC, decoder_text_encoder=EncoderWeights(seed=1))
    encoders = {**ENCODERS, "decoder_text_encoder": {"fingerprint": "d1", "config": {"width": 24}}}
    manifest = manifests.new_manifest(spec, encoders, 32, {})
    assert manifest["shapes"]["decoder_text_embeddings"] == [77, 24]
    manifests.check_encoders(manifest, spec, encoders, 32, "c")
    with pytest.raises(CacheMismatchError, match="decoder_text_encoder of fingerprint None, this run's has d1"):
        manifests.check_encoders(manifests.new_manifest(SPEC, ENCODERS, 32, {}), spec, encoders, 32, "c")
