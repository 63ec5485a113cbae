"""Data prep end to end on a real local Ray cluster, against local disk and moto's S3 server."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_bucket
from prep_factory import broken_shards, kill_after_first_commit_and_rerun, plain_shards

from latent_cache.manifest import CacheMismatchError
from latent_cache.reader import Cache
from data_prep.config import PrepConfig
from data_prep.runner import plan_run, run_prep
from data_prep.summary import format_summary
from core.config import load

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(source: str, output: str, **overrides) -> PrepConfig:
    sets = [
        f"source.url={source}", "source.format=webdataset", f"output.url={output}",
        "encode.flavor=tiny", "encode.resolution=128", "encode.batch_size=8", "encode.stage_a={}",
        "filters.min_side=64", "filters.max_pixels=1000000", "output.shards_per_wave=1",
    ] + [f"{k}={v}" for k, v in overrides.items()]
    return load(PrepConfig, None, sets)


def read_rows(url: str) -> dict[str, dict[str, np.ndarray]]:
    """key -> {tensor column -> array}, asserting that no key appears twice."""
    table = Cache(url).read_table()
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)), "duplicate keys in the cache"
    tensors = {
        name: np.concatenate([c.to_numpy_ndarray() for c in table.column(name).chunks])
        for name in ("stage_c_latents", "stage_a_latents", "text_embeddings")
        if name in table.column_names
    }
    return {key: {name: values[i] for name, values in tensors.items()} for i, key in enumerate(keys)}


@pytest.fixture(scope="module")
def broken_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken")
    kept, dropped = broken_shards(folder)
    return folder, kept, dropped


@pytest.fixture(scope="module")
def local_run(ray_cluster, broken_source, tmp_path_factory):
    folder, _, _ = broken_source
    output = tmp_path_factory.mktemp("cache") / "local"
    summary = run_prep(tiny_config(str(folder), str(output)))
    return output, summary


def test_the_cache_holds_exactly_the_good_rows_and_counts_every_bad_one(local_run, broken_source):
    output, summary = local_run
    _, kept, dropped = broken_source
    cache = Cache(str(output))
    assert sorted(cache.read_table(columns=["key"]).column("key").to_pylist()) == sorted(kept)
    manifest = cache.manifest
    assert manifest["dropped"] == dropped
    assert manifest["rows_written"] == len(kept) and manifest["rows_in"] == len(kept) + sum(dropped.values())
    assert len(manifest["shards"]) == 2 and all(s.startswith("file://") for s in manifest["shards"])
    assert manifest["encoders"]["semantic_compressor"]["weights"].startswith("random init (seed 0)")
    text = format_summary(summary)
    assert "unsafe_member_name" in text and f"rows in / out    {manifest['rows_in']} / {len(kept)}" in text


def test_cache_tensors_have_the_expected_shapes_and_values(local_run):
    output, _ = local_run
    table = Cache(str(output)).read_table()
    shapes = {name: table.schema.field(name).type.shape for name in ("stage_c_latents", "stage_a_latents", "text_embeddings")}
    assert shapes == {"stage_c_latents": [16, 3, 3], "stage_a_latents": [4, 32, 32], "text_embeddings": [77, 32]}
    z_c = np.concatenate([c.to_numpy_ndarray() for c in table.column("stage_c_latents").chunks])
    assert z_c.dtype == np.float16 and np.isfinite(z_c).all()
    # z_C = (e + 1) / 42 with e normalised by the compressor's BatchNorm (calibrated for random init):
    # e has a mean near 0 and a spread of order 1, and different images get different latents.
    e = 42.0 * z_c.astype(np.float32) - 1.0
    assert abs(float(e.mean())) < 1.5 and 0.3 < float(e.std()) < 10.0  # calibrated on other pictures
    assert float(np.abs(e[0] - e[1]).mean()) > 0.1
    assert set(table.column("bucket").to_pylist()) == {"128x128"}


def test_the_cache_holds_the_encoders_latents_of_the_decoded_source_images(local_run, broken_source):
    """The object store carries the images' encoded bytes and the encoder actor decodes them: the
    cache must hold what the encoders give on the decoded, cropped source images, computed here
    directly (one image at a time, single-threaded, as the actor does on CPU), bit for bit, with the
    fingerprints of these encoders in the manifest."""
    import pyarrow.fs as pafs
    import torch

    from data_prep.config import SourceConfig
    from data_prep.decode import decode_image
    from data_prep.operators import read_shard
    from data_prep.transforms import training_pixels
    from latent_cache.encoders import build_encoders, fold_batchnorm, spec_fingerprints
    from stages.latents import semantic_to_stage_c

    output, _ = local_run
    folder, kept, _ = broken_source
    spec = tiny_config(str(folder), str(output)).encode.spec()
    source = SourceConfig(url=str(folder), format="webdataset")
    images = {sample["key"]: sample["image_bytes"] for shard in sorted(folder.glob("*.tar"))
              for sample in read_shard({"shard_url": shard.as_uri(), "path": str(shard)}, source, pafs.LocalFileSystem())
              if sample["key"] in kept}
    semantic, _, stage_a, _ = build_encoders(spec)
    semantic, stage_a = fold_batchnorm(semantic), fold_batchnorm(stage_a)

    def encoded(encoder, pixels: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.stack([pixels])).permute(0, 3, 1, 2).float().div_(255.0)
        return encoder(batch).float()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = read_rows(str(output))
        for key in kept:
            full, small = training_pixels(decode_image(images[key], max_pixels=1_000_000), (128, 128), (96, 96))
            with torch.no_grad():
                expected = {"stage_c_latents": semantic_to_stage_c(encoded(semantic, small)),
                            "stage_a_latents": encoded(stage_a.encode, full)}
            for name, value in expected.items():
                assert rows[key][name].tobytes() == value.numpy().astype(np.float16)[0].tobytes(), (key, name)
    finally:
        torch.set_num_threads(threads)
    assert Cache(str(output)).manifest["encoders"] == spec_fingerprints(spec)[0]


def test_plain_pyarrow_reads_a_shard_with_its_tensor_shapes(local_run):
    output, _ = local_run
    shard = Cache(str(output)).files[0]
    code = (
        "import sys, pyarrow.parquet as pq\n"
        f"t = pq.read_table({shard!r})\n"
        "a = t.column('stage_c_latents').chunk(0).to_numpy_ndarray()\n"
        "print(a.shape, a.dtype, 'ray' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(")")[0].endswith("16, 3, 3") and "float16 False" in result.stdout


def test_rerun_is_a_no_op_and_new_shards_are_appended(ray_cluster, local_run, broken_source, tmp_path):
    output, _ = local_run
    folder, kept, _ = broken_source
    before = Cache(str(output)).manifest
    again = run_prep(tiny_config(str(folder), str(output)))
    assert again["shards_new"] == 0 and Cache(str(output)).manifest["files"] == before["files"]

    extra = tmp_path / "more"
    plain_shards(extra, shards=1, per_shard=3, seed0=500)
    (folder / "shard-002.tar").write_bytes((extra / "shard-000.tar").read_bytes())
    try:
        added = run_prep(tiny_config(str(folder), str(output)))
    finally:
        (folder / "shard-002.tar").unlink()
    assert added["shards_new"] == 1 and added["rows_written"] == 3
    assert Cache(str(output)).rows == len(kept) + 3


def test_a_cache_of_other_encoders_is_refused_with_both_fingerprints(local_run, broken_source):
    output, _ = local_run
    folder, _, _ = broken_source
    cache = Cache(str(output))
    ours = cache.fingerprints()["text_encoder"]
    with pytest.raises(CacheMismatchError, match=rf"text_encoder of fingerprint {ours}.*has fingerprint abc123"):
        cache.check_fingerprints({"text_encoder": "abc123"})
    other_seed = tiny_config(str(folder), str(output), **{"encode.text_encoder.seed": 7})
    with pytest.raises(CacheMismatchError, match="appending would mix latents of different encoders"):
        run_prep(other_seed)


def test_new_shards_from_other_encoders_are_refused_before_any_commit(ray_cluster, local_run, tmp_path):
    """The fingerprints are checked when the stream's first rows arrive: nothing may be committed."""
    output, _ = local_run
    source = plain_shards(tmp_path / "more", shards=1, per_shard=3, seed0=700)
    before = (output / "manifest.json").read_text()
    with pytest.raises(CacheMismatchError, match="appending would mix latents of different encoders"):
        run_prep(tiny_config(str(source), str(output), **{"encode.text_encoder.seed": 7}))
    assert (output / "manifest.json").read_text() == before


def test_a_threshold_on_a_column_the_source_lacks_is_a_configuration_error(ray_cluster, broken_source, tmp_path):
    folder, _, _ = broken_source
    cfg = tiny_config(str(folder), str(tmp_path / "c"), **{"filters.metadata": "{pwatermark: {max: 0.5}}"})
    with pytest.raises(ValueError, match=r"threshold on 'pwatermark'.*have no such metadata \(they have: \['aesthetic', 'height', 'width'\]\)"):
        run_prep(cfg)


def test_near_dedup_without_exact_dedup_keeps_distinct_images_run_after_run(ray_cluster, tmp_path):
    """`dedup.exact: false` with `near_max_distance`: every distinct image is kept, in the first run and
    in a second one against the (then non-empty) cache. The first run used to keep one row and drop the
    rest as `duplicate_exact` (every content hash was None), the second to keep none."""
    source = plain_shards(tmp_path / "src", shards=2, per_shard=4)
    output = tmp_path / "cache"
    dedup = {"filters.dedup.exact": "false", "filters.dedup.near_max_distance": "4"}
    first = run_prep(tiny_config(str(source), str(output), limit_shards=1, **dedup))
    assert (first["rows_written"], dict(first["dropped"])) == (4, {})
    second = run_prep(tiny_config(str(source), str(output), **dedup))
    assert (second["rows_written"], dict(second["dropped"])) == (4, {})
    assert len(read_rows(str(output))) == 8


def test_the_same_against_s3(ray_cluster, broken_source, local_run):
    import boto3

    folder, kept, dropped = broken_source
    bucket = make_bucket("prep-source")
    s3 = boto3.client("s3")
    for shard in sorted(folder.glob("*.tar")):
        s3.upload_file(str(shard), bucket, f"shards/{shard.name}")
    make_bucket("prep-cache")
    summary = run_prep(tiny_config(f"s3://{bucket}/shards/", "s3://prep-cache/tiny"))
    assert summary["rows_written"] == len(kept)
    cache = Cache("s3://prep-cache/tiny")
    assert cache.manifest["dropped"] == dropped
    assert all(s.startswith("s3://prep-source/shards/") for s in cache.manifest["shards"])
    listed = s3.list_objects_v2(Bucket="prep-cache", Prefix="tiny/")["Contents"]
    assert any(o["Key"] == "tiny/manifest.json" for o in listed)
    # The same encoders on the same images: the same latents as the local run.
    local, remote = read_rows(str(local_run[0])), read_rows("s3://prep-cache/tiny")
    assert set(remote) == set(kept)
    for key in kept:
        for name, value in remote[key].items():
            np.testing.assert_array_equal(value, local[key][name], err_msg=f"{key} {name}")


def test_a_source_and_cache_in_another_region_than_the_default(ray_cluster, tmp_path):
    """Buckets in eu-west-1 while AWS_DEFAULT_REGION says us-east-1: the listing finds the region and
    the read tasks get its filesystem. (moto serves any region, so what is checked on the way is the
    region the read tasks are handed; see test_storage.py.)"""
    import boto3

    source = plain_shards(tmp_path / "src", shards=1, per_shard=3)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="prep-eu", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    s3.upload_file(str(source / "shard-000.tar"), "prep-eu", "shards/shard-000.tar")
    cfg = tiny_config("s3://prep-eu/shards/", "s3://prep-eu/cache")
    assert plan_run(cfg).source_fs.region == "eu-west-1" and os.environ["AWS_DEFAULT_REGION"] == "us-east-1"
    assert run_prep(cfg)["rows_written"] == 3
    assert Cache("s3://prep-eu/cache").fs.region == "eu-west-1"


def test_a_source_the_bucket_refuses_to_read_stops_the_run_uncommitted(ray_cluster, tmp_path):
    """Listing allowed, reading the shards denied (a bucket policy; moto enforces it on objects): the
    run ends with AccessDeniedError and one line, committing nothing. It used to count every shard as
    `unreadable_shard` and commit them, so that no rerun would read them again."""
    import boto3

    from core.storage import AccessDeniedError

    source = plain_shards(tmp_path / "src", shards=1, per_shard=2)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="prep-refused")
    s3.upload_file(str(source / "shard-000.tar"), "prep-refused", "shards/shard-000.tar")
    deny = {"Effect": "Deny", "Principal": "*", "Action": "s3:GetObject", "Resource": ["arn:aws:s3:::prep-refused/*"]}
    s3.put_bucket_policy(Bucket="prep-refused", Policy=json.dumps({"Version": "2012-10-17", "Statement": [deny]}))
    output = tmp_path / "cache"
    with pytest.raises(AccessDeniedError) as refused:
        run_prep(tiny_config("s3://prep-refused/shards/", str(output)))
    assert str(refused.value).startswith("s3://prep-refused/shards/shard-000.tar: access denied")
    assert "\n" not in str(refused.value)
    assert not (output / "manifest.json").exists()


def test_a_killed_run_resumes_without_duplicates_or_gaps(ray_cluster, tmp_path):
    source = plain_shards(tmp_path / "src", shards=5, per_shard=6)
    reference = tmp_path / "reference"
    run_prep(tiny_config(str(source), str(reference)))

    output = tmp_path / "killed"
    kill_after_first_commit_and_rerun(_as_sets(tiny_config(str(source), str(output))), output, ray_cluster, shards=5)
    resumed, expected = read_rows(str(output)), read_rows(str(reference))
    assert sorted(resumed) == sorted(expected) and len(resumed) == 30
    for key, tensors in expected.items():
        for name, value in tensors.items():
            np.testing.assert_array_equal(resumed[key][name], value, err_msg=f"{key} {name}")


def _as_sets(cfg: PrepConfig) -> list[str]:
    return [
        f"source.url={cfg.source.url}", "source.format=webdataset", f"output.url={cfg.output.url}",
        "encode.flavor=tiny", "encode.resolution=128", "encode.batch_size=8", "encode.stage_a={}",
        "filters.min_side=64", "filters.max_pixels=1000000", "output.shards_per_wave=1",
    ]
