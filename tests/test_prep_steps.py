"""The data-prep steps one at a time: decode + filter, CLIP-score filter, deduplication, encode, finalize, configs."""

import io
import json
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image
from prep_factory import image_bytes, write_tar

from data_prep.config import ClipScoreConfig, DedupConfig, FilterConfig, PrepConfig, SourceConfig
from data_prep.decode import DEFAULT_MAX_PIXELS
from data_prep.filters import check_rules, funnel
from data_prep.operators import ClipScoreFilter, Deduplicate, read_shard
from core.config import ConfigError, load
from latent_cache.writer import KEEP, finalize

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _batch(n: int, side: int = 64) -> dict:
    """Samples as the decode tasks pass them on: their pictures (noise) as lossless PNG bytes."""
    rng = np.random.default_rng(0)
    return {
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "caption": np.array([f"caption {i}" for i in range(n)], dtype=object),
        "drop_reason": np.array([KEEP] * n, dtype=object),
        "image_bytes": np.array([_png(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)], dtype=object),
        "clip_score": np.full(n, np.nan, dtype=np.float32),
        "content_hash": np.array([f"h{i}" for i in range(n)], dtype=object),
        "phash": rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + np.uint64(1),  # far apart
    }


def _pictures(n: int, seed: int) -> list[bytes]:
    """JPEGs of n sizes, landscape and portrait: what the encoder actor gets to decode and cut."""
    return [image_bytes(seed + i, (150 + 11 * i, 110 + 40 * (i % 3))) for i in range(n)]


def test_a_shard_is_read_as_a_stream_never_all_in_memory(tmp_path):
    """A web shard is ~1 GB of encoded bytes: the read task hands on each sample as it comes (Ray
    Data cuts them into blocks), so it holds at most the tar reader's window of open keys (64
    samples), not the shard."""
    size, n = 64 * 1024, 320  # 20 MiB of member bytes
    rng = np.random.default_rng(0)
    members = []
    for i in range(n):
        members += [(f"k{i:03d}.jpg", rng.bytes(size)), (f"k{i:03d}.txt", f"caption {i}".encode())]
    shard = write_tar(tmp_path / "shard.tar", members)
    source = SourceConfig(url=str(tmp_path), format="webdataset")

    tracemalloc.start()
    try:
        keys = []
        for sample in read_shard({"shard_url": shard.as_uri(), "path": str(shard)}, source, pafs.LocalFileSystem()):
            assert len(sample["image_bytes"]) == size and sample["caption"] == f"caption {len(keys)}"
            keys.append(sample["key"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert keys == [f"k{i:03d}" for i in range(n)]
    assert peak < 100 * size, f"reading the shard held {peak / 2**20:.1f} MiB at once"


def test_clip_score_filter_keeps_laion_semantics(tmp_path):
    """Scores are cosine similarities of the normalised image and text embeddings; below `min` drops.
    The filter decodes the image bytes it is passed itself (here 64 px PNGs at resolution 64: the
    pixels as they are)."""
    (tmp_path / "tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    probe_config = ClipScoreConfig(model=str(tmp_path / "tiny-clip.json"), random_weights=True)
    probe = ClipScoreFilter(probe_config, resolution=64, max_pixels=DEFAULT_MAX_PIXELS)
    batch = _batch(6)
    batch["drop_reason"][5] = "too_small"
    images = [np.asarray(Image.open(io.BytesIO(batch["image_bytes"][i]))) for i in range(5)]
    expected = probe.scores(images, [f"caption {i}" for i in range(5)])
    threshold = float(np.median(expected))  # a random model's scores: split them at their median
    config = ClipScoreConfig(model=str(tmp_path / "tiny-clip.json"), min=threshold, random_weights=True)
    stage = ClipScoreFilter(config, resolution=64, max_pixels=DEFAULT_MAX_PIXELS)
    stage.model = probe.model
    out = stage(batch)
    np.testing.assert_allclose(out["clip_score"][:5], expected, rtol=1e-5)
    with torch.no_grad():  # LAION's definition, written out: cosine similarity of the two embeddings
        image_emb = probe.model.encode_image(torch.stack([probe.preprocess(Image.fromarray(im)) for im in images]))
        text_emb = probe.model.encode_text(probe.tokenizer([f"caption {i}" for i in range(5)]))
        reference = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1).numpy()
    np.testing.assert_allclose(expected, reference, rtol=1e-4, atol=1e-6)
    assert np.isnan(out["clip_score"][5]) and out["drop_reason"][5] == "too_small"
    for i in range(5):
        assert (out["drop_reason"][i] == "clip_score") == (expected[i] < threshold)
        assert (out["image_bytes"][i] == b"") == (expected[i] < threshold)
    assert np.all(np.abs(expected) <= 1.0 + 1e-6)
    assert sum(out["drop_reason"][i] == "clip_score" for i in range(5)) == 2


def test_decode_tasks_hand_on_the_encoded_bytes_and_drop_corrupt_images_with_their_reason():
    """The decode tasks decode every image to check and hash it, but hand on its encoded bytes, not
    pixels; a corrupt image is dropped with its reason, counted from its row, and carries no bytes on."""
    from data_prep.decode import decode_image
    from data_prep.hashing import content_hash, perceptual_hash
    from data_prep.operators import decode_and_filter

    good = image_bytes(1)
    bomb = io.BytesIO()
    Image.new("L", (1200, 1000)).save(bomb, format="PNG")  # 1.2 Mpx > the bound below
    images = {
        "good": good, "cut": image_bytes(4)[:300], "noise": np.random.default_rng(5).bytes(2000), "bomb": bomb.getvalue(),
        "small": image_bytes(2, (32, 40)), "missing": None,
    }
    n = len(images)
    batch = {
        "key": list(images), "caption": [f"caption {k}" for k in images], "source_shard": ["s"] * n, "metadata": ["{}"] * n,
        "drop_reason": [KEEP] * (n - 1) + ["missing_image"], "image_bytes": list(images.values()),
    }
    out = decode_and_filter({k: np.array(v, dtype=object) for k, v in batch.items()}, FilterConfig(min_side=64, max_pixels=1_000_000))
    assert list(out["drop_reason"]) == [KEEP, "truncated_image", "not_an_image", "decompression_bomb", "too_small", "missing_image"]
    assert out["image_bytes"][0] == good and list(out["image_bytes"][1:]) == [b""] * (n - 1)
    assert (out["width"][0], out["height"][0], out["content_hash"][0]) == (96, 80, content_hash(good))
    assert int(out["phash"][0]) == perceptual_hash(decode_image(good))
    assert set(out) == {"key", "caption", "source_shard", "metadata", "width", "height", "content_hash", "phash",
                        "clip_score", "drop_reason", "image_bytes"}  # no pixels


def test_dedup_stage_marks_exact_and_near_duplicates_against_the_cache():
    batch = _batch(5)
    batch["content_hash"][3] = "h0"  # the same bytes as row 0
    batch["phash"][4] = batch["phash"][2] ^ np.uint64(0b101)  # 2 bits from row 2
    known = [("cached", int(batch["phash"][1]) ^ 1)]  # one bit from row 1, already in the cache
    out = Deduplicate(DedupConfig(exact=True, near_max_distance=2), known)(pa.table(batch))
    assert out.column("drop_reason").to_pylist() == [KEEP, "duplicate_near", KEEP, "duplicate_exact", "duplicate_near"]
    kept_bytes = out.column("image_bytes").to_pylist()
    assert kept_bytes[3] == b"" and kept_bytes[0] == batch["image_bytes"][0] and kept_bytes[2] == batch["image_bytes"][2]
    off = Deduplicate(DedupConfig(exact=False, near_max_distance=None), [])(pa.table(_batch(3)))
    assert off.column("drop_reason").to_pylist() == [KEEP] * 3


def test_dedup_stage_with_exact_off_keeps_distinct_images_against_a_cache():
    """exact: false, near on: distinct images are all kept, in a fresh run and against a cache (no
    content hash is looked up, so none can match)."""
    batch = _batch(5)
    batch["content_hash"][:] = ""  # what a run with exact dedup off must not key on
    known = [("cached", 12345), ("cached", 67890)]
    for cache in ([], known):
        out = Deduplicate(DedupConfig(exact=False, near_max_distance=4), cache)(pa.table(batch))
        assert out.column("drop_reason").to_pylist() == [KEEP] * 5
    near = dict(batch, phash=batch["phash"].copy())
    near["phash"][3] = near["phash"][0] ^ np.uint64(0b11)
    out = Deduplicate(DedupConfig(exact=False, near_max_distance=4), known)(pa.table(near))
    assert out.column("drop_reason").to_pylist() == [KEEP, KEEP, KEEP, "duplicate_near", KEEP]


def test_finalize_keeps_only_kept_rows_as_fixed_shape_tensors():
    n = 3
    table = pa.table({
        "key": ["a", "b", "c"], "caption": ["x", "y", "z"], "source_shard": ["s"] * n, "width": [1, 2, 3],
        "height": [1, 2, 3], "metadata": ["{}"] * n, "content_hash": ["1", "2", "3"], "phash": pa.array([1, 2, 3], pa.uint64()),
        "clip_score": [0.1, 0.2, 0.3], "drop_reason": [KEEP, "too_small", KEEP],
        "stage_c_latents": [np.full((16, 2, 2), i, np.float16).tobytes() if i != 1 else b"" for i in range(n)],
    })
    out = finalize(table, {"64x64": {"stage_c_latents": [16, 2, 2]}})["64x64"]
    assert out.column("key").to_pylist() == ["a", "c"] and "drop_reason" not in out.column_names
    tensors = out.column("stage_c_latents").chunk(0).to_numpy_ndarray()
    assert tensors.shape == (2, 16, 2, 2) and tensors[1].max() == 2


def test_rules_and_the_funnel():
    cfg = FilterConfig(min_side=64, max_side=1000, max_aspect=2.0, min_caption_words=2, max_caption_chars=30,
                       metadata={"aesthetic|AESTHETIC_SCORE": {"min": 5.0}})
    ok = {"AESTHETIC_SCORE": 5.5}
    assert check_rules(100, 100, "a cat", ok, cfg) is None
    assert check_rules(50, 100, "a cat", ok, cfg) == "too_small"
    assert check_rules(100, 1100, "a cat", ok, cfg) == "too_large"
    assert check_rules(100, 300, "a cat", ok, cfg) == "aspect_ratio"
    assert check_rules(100, 100, "cat", ok, cfg) == "caption_too_short"
    assert check_rules(100, 100, "a " * 20, ok, cfg) == "caption_too_long"
    assert check_rules(100, 100, "a cat", {}, cfg) == "metadata_missing"
    assert check_rules(100, 100, "a cat", {"aesthetic": 4.0}, cfg) == "metadata_threshold"
    rows = funnel({"too_small": 3, "not_an_image": 2, "duplicate_exact": 1}, 20)
    assert rows == [
        {"reason": "not_an_image", "seen": 20, "dropped": 2},
        {"reason": "too_small", "seen": 18, "dropped": 3},
        {"reason": "duplicate_exact", "seen": 15, "dropped": 1},
    ]


def test_the_original_wuerstchen_preset():
    cfg = FilterConfig(preset="wuerstchen_original")
    assert (cfg.min_side, cfg.max_side) == (512, 4096)
    assert {k: (t.min, t.max) for k, t in cfg.metadata.items()} == {
        "pwatermark": (None, 0.5), "aesthetic|AESTHETIC_SCORE": (5.0, None), "punsafe": (None, 0.99)
    }
    assert FilterConfig(preset="wuerstchen_original", min_side=256).min_side == 256  # explicit settings win
    with pytest.raises(ValueError, match="filters.preset must be one of"):
        FilterConfig(preset="laion_safe")


def test_configs_name_unknown_keys_and_wrong_types(tmp_path):
    path = tmp_path / "prep.yaml"
    path.write_text("encode:\n  resolutoin: 512\n")
    with pytest.raises(ConfigError, match=r"prep.yaml: encode: unknown key 'resolutoin' \(known keys: .*resolution"):
        load(PrepConfig, path)
    with pytest.raises(ConfigError, match="encode.batch_size: Input should be a valid integer.*'many'"):
        load(PrepConfig, None, ["encode.batch_size=many"])
    with pytest.raises(ConfigError, match="encode.text_mode must be one of"):
        load(PrepConfig, None, ["encode.text_mode=pixels"])
    cfg = load(PrepConfig, None, ["encode.resolution=512", "output.url=s3://b/c", "filters.dedup.near_max_distance=3"])
    assert (cfg.encode.resolution, cfg.output.url, cfg.filters.dedup.near_max_distance) == (512, "s3://b/c", 3)


def test_the_shipped_configs_load():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("prep_*.yaml")):
        load(PrepConfig, path)


def test_random_init_encoders_are_the_same_whatever_the_global_rng_state():
    """Prep and training build the encoders in different processes: their fingerprints must agree."""
    from latent_cache.spec import EncoderWeights
    from latent_cache.encoders import build_semantic_compressor, build_stage_a, model_fingerprint

    prints = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        torch.rand(global_seed)
        w = EncoderWeights(seed=0)
        prints.append((model_fingerprint("s", build_semantic_compressor("tiny", w), w)["fingerprint"],
                       model_fingerprint("a", build_stage_a("tiny", w), w)["fingerprint"]))
    assert prints[0] == prints[1]


def test_a_sample_gets_the_same_latents_whatever_batch_the_stream_put_it_in():
    """A resumed run cuts the stream into batches elsewhere than an uninterrupted one; CPU kernels
    choose their algorithm by batch size, so the encoder pads every call to `batch_size`."""
    from data_prep.config import EncodeConfig
    from latent_cache.spec import EncoderWeights
    from data_prep.operators import Encode

    threads = torch.get_num_threads()
    config = EncodeConfig(flavor="tiny", resolution=128, batch_size=8, stage_a=EncoderWeights(), cpus_per_encoder=2)
    stage = Encode(config, DEFAULT_MAX_PIXELS)
    torch.set_num_threads(threads)
    batch = {
        "key": np.array([f"k{i}" for i in range(8)], dtype=object),
        "caption": np.array([f"caption {i}" for i in range(8)], dtype=object),
        "drop_reason": np.array([KEEP] * 7 + ["too_small"], dtype=object),
        "image_bytes": np.array(_pictures(7, 1) + [b""], dtype=object),
    }
    whole = stage(pa.table(batch))
    assert "image_bytes" not in whole.column_names
    for cut in (slice(0, 1), slice(1, 5), slice(5, 8), slice(None, None, -1)):
        part = stage(pa.table({k: v[cut] for k, v in batch.items()}))
        for name in ("stage_c_latents", "stage_a_latents", "text_embeddings"):
            assert part.column(name).to_pylist() == whole.column(name).to_pylist()[cut], name
    latents = whole.column("stage_c_latents").to_pylist()
    assert latents[7] == b"" and len(latents[6]) == 16 * 3 * 3 * 2


def test_encode_images_keeps_the_cropped_pixels_as_the_images_column():
    """encode.images: the pixels the encoders saw become the cache's uint8 [R, R, 3] images column
    (what Stage A training reads), for the kept rows only, byte for byte; encode.semantic_images
    likewise the semantic compressor's input (what it trains on with Stage B)."""
    from data_prep.config import EncodeConfig
    from data_prep.operators import Encode
    from latent_cache.writer import finalize

    threads = torch.get_num_threads()
    cfg = EncodeConfig(flavor="tiny", resolution=64, batch_size=4, cpus_per_encoder=1, images=True, semantic_images=True)
    stage = Encode(cfg, DEFAULT_MAX_PIXELS)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(4)
    # 64 px PNGs at resolution 64, and 0.75 x 64 -> 64 on the multiple of 32: both squares are the pixels as they are
    pixels = [rng.integers(0, 256, (64, 64, 3), np.uint8) for _ in range(3)]
    n = 3
    batch = pa.table({
        "key": [f"k{i}" for i in range(n)], "caption": [f"caption {i}" for i in range(n)],
        "drop_reason": [KEEP, "too_small", KEEP], "image_bytes": [_png(p) if i != 1 else b"" for i, p in enumerate(pixels)],
        "source_shard": ["s"] * n, "width": [64] * n, "height": [64] * n, "metadata": ["{}"] * n,
        "content_hash": ["h"] * n, "phash": pa.array([0] * n, pa.uint64()), "clip_score": [float("nan")] * n,
    })
    shapes = cfg.spec().tensor_shapes(text_width=32)
    assert shapes["images"] == shapes["semantic_images"] == [64, 64, 3]
    rows = finalize(stage(batch), {"64x64": shapes})["64x64"]
    for name in ("images", "semantic_images"):
        images = rows.column(name).combine_chunks().to_numpy_ndarray()
        assert images.dtype == np.uint8 and images.shape == (2, 64, 64, 3)
        np.testing.assert_array_equal(images, np.stack([pixels[0], pixels[2]]))
    assert "image_bytes" not in rows.column_names
    assert EncodeConfig(flavor="tiny", resolution=256, semantic_images=True).spec().tensor_shapes(32)["semantic_images"] == [192, 192, 3]


def test_an_encoder_actor_running_two_blocks_at_once_gives_each_the_latents_it_gets_alone():
    """On CPU the encoder actor runs two calls at a time on one thread pool (the tokenizer shared):
    from its very first calls, each block gets what it gets when encoded alone."""
    from concurrent.futures import ThreadPoolExecutor

    from data_prep.config import EncodeConfig
    from data_prep.operators import Encode

    threads = torch.get_num_threads()
    stage = Encode(EncodeConfig(flavor="tiny", resolution=128, batch_size=4, cpus_per_encoder=2), DEFAULT_MAX_PIXELS)
    torch.set_num_threads(threads)
    blocks = [pa.table({
        "key": [f"b{b}k{i}" for i in range(6)],
        "caption": [f"block {b} caption {i} " + "word " * (5 * i) for i in range(6)],
        "drop_reason": [KEEP] * 6,
        "image_bytes": _pictures(6, 10 * b),
    }) for b in range(4)]
    with ThreadPoolExecutor(2) as calls:  # the first two calls start together, on a fresh tokenizer
        together = list(calls.map(stage, blocks))
    for block, out in zip(blocks, together):
        alone = stage(block)
        for name in ("stage_c_latents", "text_embeddings"):
            assert out.column(name).equals(alone.column(name)), name


def test_the_device_path_cuts_stage_a_into_fixed_parts_and_agrees_with_one_image_per_job():
    """The GPU path (batches padded to batch_size, Stage A in parts of stage_a_batch_size), run here
    on the CPU: every row gets its own latents, as the per-image jobs give them up to rounding."""
    from latent_cache.writer import binary_buffers
    from data_prep.config import EncodeConfig
    from latent_cache.spec import EncoderWeights
    from data_prep.operators import Encode

    threads = torch.get_num_threads()
    config = EncodeConfig(flavor="tiny", resolution=128, batch_size=8, stage_a=EncoderWeights(), stage_a_batch_size=3)
    stage = Encode(config, DEFAULT_MAX_PIXELS)
    torch.set_num_threads(threads)
    batch = pa.table({
        "key": [f"k{i}" for i in range(11)], "caption": [f"caption {i}" for i in range(11)],
        "drop_reason": [KEEP] * 10 + ["too_small"], "image_bytes": _pictures(10, 3) + [b""],
    })
    per_image = stage(batch)
    stage.per_image_jobs = False  # the device path, on this CPU
    batched = stage(batch)
    for name, dtype in (("stage_c_latents", np.float16), ("stage_a_latents", np.float16), ("text_embeddings", np.float16)):
        a, b = (binary_buffers(t.column(name))[1].view(dtype).astype(np.float32) for t in (per_image, batched))
        assert a.shape == b.shape and np.isfinite(b).all()
        np.testing.assert_allclose(b, a, atol=2e-2 * np.abs(a).max(), err_msg=name)
    assert batched.column("stage_a_latents").to_pylist()[10] == b""


def test_the_encoder_actor_gives_the_encoders_latents_of_the_squares_cut_from_the_decoded_bytes():
    """The actor decodes and cuts the image bytes itself, into the same squares the decode tasks
    used to cut and pass on as pixels (`training_pixels` of `decode_image`): its latents are, bit for
    bit, the encoders' on those squares. One image per call on CPU; on the device path (run here on
    the CPU) batches of exactly batch_size (the last one padded with its last image) and Stage A in
    parts of stage_a_batch_size, with the pool filling the next batch while one is encoded."""
    from data_prep.config import EncodeConfig
    from data_prep.decode import decode_image
    from data_prep.operators import Encode
    from data_prep.transforms import training_pixels
    from latent_cache.spec import EncoderWeights
    from stages.latents import semantic_to_stage_c

    threads = torch.get_num_threads()
    config = EncodeConfig(flavor="tiny", resolution=128, batch_size=4, stage_a=EncoderWeights(), stage_a_batch_size=3,
                          cpus_per_encoder=2)
    stage = Encode(config, DEFAULT_MAX_PIXELS)
    pictures = _pictures(12, 50)
    reasons = [KEEP] * 5 + ["duplicate_exact"] + [KEEP] * 6  # 11 kept: device batches of 4, 4 and 3 (+1 padding)
    kept = [i for i, reason in enumerate(reasons) if reason == KEEP]
    batch = pa.table({
        "key": [f"k{i}" for i in range(12)], "caption": [f"caption {i}" for i in range(12)], "drop_reason": reasons,
        "image_bytes": [p if reason == KEEP else b"" for p, reason in zip(pictures, reasons)],
    })
    squares = [training_pixels(decode_image(pictures[i]), (128, 128), (96, 96)) for i in kept]  # (128 px, 96 px)

    def as_input(arrays):  # as the decode tasks' pixel columns were read: a contiguous uint8 batch
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)

    def latent_bytes(semantic, stage_a) -> dict[str, list[bytes]]:
        z_c = semantic_to_stage_c(semantic.float()).numpy().astype(np.float16)
        return {"stage_c_latents": [z.tobytes() for z in z_c],
                "stage_a_latents": [a.tobytes() for a in stage_a.float().numpy().astype(np.float16)]}

    try:
        with torch.no_grad():
            one_by_one = latent_bytes(torch.cat([stage.semantic(as_input([sem])) for _, sem in squares]),
                                      torch.cat([stage.stage_a.encode(as_input([full])) for full, _ in squares]))
            semantic, stage_a = [], []
            for first in range(0, len(squares), 4):
                rows = squares[first : first + 4]
                padded = rows + [rows[-1]] * (4 - len(rows))
                semantic.append(stage.semantic(as_input([sem for _, sem in padded]))[: len(rows)])
                stage_a.append(torch.cat([stage.stage_a.encode(as_input([full for full, _ in padded[i : i + 3]]))
                                          for i in (0, 3)])[: len(rows)])
            batched = latent_bytes(torch.cat(semantic), torch.cat(stage_a))
        for device_path, expected in ((False, one_by_one), (True, batched)):
            stage.per_image_jobs = not device_path
            out = stage(batch)
            for name, values in expected.items():
                column = out.column(name).to_pylist()
                assert [column[i] for i in kept] == values and column[5] == b"", (name, device_path)
    finally:
        torch.set_num_threads(threads)


def test_stage_a_parts_hold_an_image_at_least():
    from data_prep.config import EncodeConfig

    with pytest.raises(ValueError, match=r"stage_a_batch_size: Input should be greater than 0 \(got 0\)"):
        EncodeConfig(stage_a_batch_size=0)


def test_encoder_actors_state_their_encoders_and_a_disagreement_is_refused():
    """The manifest's fingerprints come from the encoder actors themselves; they must be the ones a
    trainer computes for the same config, and rows of actors that loaded other weights are refused."""
    from data_prep.config import EncodeConfig
    from data_prep.operators import Encode
    from latent_cache.encoders import spec_fingerprints
    from latent_cache.writer import ENCODERS_COLUMN, stream_encoders

    cfg = PrepConfig(encode=EncodeConfig(flavor="tiny", resolution=128, batch_size=4, text_mode="tokens"))
    threads = torch.get_num_threads()
    stage = Encode(cfg.encode, cfg.filters.max_pixels)
    torch.set_num_threads(threads)
    first, third = _pictures(2, 7)
    batch = pa.table({
        "key": ["a", "b", "c"], "caption": ["one", "two", "three"], "drop_reason": [KEEP, "too_small", KEEP],
        "image_bytes": [first, b"", third],
    })
    rows = stage(batch)
    assert rows.num_rows == 3 and rows.column(ENCODERS_COLUMN).null_count == 0  # dropped rows state them too
    assert stream_encoders(rows) == (stage.identity, spec_fingerprints(cfg.encode.spec()))

    other = json.loads(stage.identity)
    other["encoders"]["semantic_compressor"]["fingerprint"] = "0" * 32
    mixed = pa.concat_tables([rows, rows.set_column(
        rows.schema.get_field_index(ENCODERS_COLUMN), ENCODERS_COLUMN,
        pa.array([json.dumps(other, sort_keys=True)] * 3).dictionary_encode(),
    )])
    with pytest.raises(RuntimeError, match="state different encoders"):
        stream_encoders(mixed)


def test_training_pixels_are_the_centre_square_resampled_from_the_source():
    from PIL import Image

    from data_prep.transforms import training_pixels

    image = Image.new("RGB", (300, 100), (0, 0, 0))
    image.paste((255, 255, 255), (100, 0, 200, 100))  # the centre square is white, the sides black
    pixels, semantic = training_pixels(image, (64, 64), (48, 48))
    assert pixels.shape == (64, 64, 3) and semantic.shape == (48, 48, 3)
    assert pixels[:, 4:-4].min() == 255 and semantic[:, 4:-4].min() == 255  # resampling may blur the edge columns
    none, semantic_alone = training_pixels(image, None, (48, 48))
    assert none is None and np.array_equal(semantic_alone, semantic)  # the same with or without Stage A


def test_folding_batchnorm_into_the_convolutions_keeps_the_encoders_function():
    from latent_cache.spec import EncoderWeights
    from latent_cache.encoders import build_semantic_compressor, build_stage_a, fold_batchnorm

    for build, run, side in ((build_semantic_compressor, lambda m, x: m(x), 96), (build_stage_a, lambda m, x: m.encode(x), 64)):
        model = build("tiny", EncoderWeights())
        x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            before = run(model, x)
            bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
            after = run(fold_batchnorm(model), x)
        assert bns > 0 and sum(isinstance(m, torch.nn.BatchNorm2d) for m in fold_batchnorm(model).modules()) < bns
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
