"""Aspect-ratio buckets in data prep (latent_cache/buckets.py) on a real local Ray cluster: every
image cut to the bucket its aspect ratio selects, each bucket's rows in files of its own tensor
shapes, the manifest's counts, and a killed run's rerun giving the same rows."""

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from prep_factory import good, kill_after_first_commit_and_rerun, write_tar

from core.config import load
from data_prep.config import PrepConfig
from data_prep.runner import run_prep
from data_prep.summary import format_summary
from latent_cache import buckets
from latent_cache.manifest import CacheMismatchError
from latent_cache.reader import Cache, is_validation

BUCKETS = ["160x96", "128x128", "96x160"]  # tall, square, wide (height x width) at resolution 128
# (width, height) of each source image, and the bucket its aspect ratio is nearest to, by hand:
# log(w/h) against log(96/160) = -0.51, 0 and +0.51; halfway is +-0.255 (w/h 0.77 and 1.29).
SIZES = [((80, 140), "160x96"), ((90, 120), "160x96"), ((100, 100), "128x128"), ((110, 100), "128x128"),
         ((96, 80), "128x128"), ((140, 100), "96x160"), ((150, 86), "96x160"), ((200, 70), "96x160")]


def _source(folder: Path, shards: int = 4) -> dict[str, str]:
    """`shards` tars of the SIZES images each; key -> the bucket it belongs in."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for s in range(shards):
        members = []
        for i, (size, bucket) in enumerate(SIZES):
            members += good(f"s{s}/img{i}", 1000 + s * 100 + i, size=size)
            expected[f"s{s}/img{i}"] = bucket
        write_tar(folder / f"shard-{s:03d}.tar", members)
    return expected


def _sets(source: Path, output: Path) -> list[str]:
    return [f"source.url={source}", "source.format=webdataset", f"output.url={output}", "encode.flavor=tiny",
            "encode.resolution=128", "encode.batch_size=4", "encode.stage_a={}", "encode.images=true",
            f"encode.buckets=[{', '.join(BUCKETS)}]", "filters.min_side=64", "filters.max_pixels=1000000",
            "output.shards_per_wave=1", "output.max_rows_per_file=4"]


def _rows(url: str) -> dict[str, dict]:
    """key -> {bucket, each tensor column}, read bucket by bucket; no key twice."""
    cache, out = Cache(url), {}
    for bucket in cache.buckets:
        table = cache.read_table(bucket=bucket)
        tensors = {name: np.concatenate([c.to_numpy_ndarray() for c in table.column(name).chunks])
                   for name in ("stage_c_latents", "stage_a_latents", "text_embeddings", "images")}
        for i, key in enumerate(table.column("key").to_pylist()):
            assert key not in out, f"{key} twice"
            out[key] = {"bucket": table.column("bucket")[i].as_py(), **{name: t[i] for name, t in tensors.items()}}
    return out


def test_every_image_lands_in_the_bucket_its_aspect_ratio_selects_in_files_of_its_shapes(ray_cluster, tmp_path):
    from data_prep.decode import decode_image
    from data_prep.transforms import training_pixels
    from stages.latents import semantic_image_size

    expected = _source(tmp_path / "src")
    cfg = load(PrepConfig, None, _sets(tmp_path / "src", tmp_path / "cache"))
    summary = run_prep(cfg)
    cache = Cache(str(tmp_path / "cache"))
    counts = {b: sum(1 for v in expected.values() if v == b) for b in BUCKETS}
    assert {b: info["rows"] for b, info in cache.buckets.items()} == counts and cache.rows == len(expected)
    assert list(cache.buckets) == BUCKETS  # from the tallest to the widest
    for bucket, info in cache.buckets.items():
        height, width = buckets.parse(bucket)
        sem_h, sem_w = semantic_image_size(height, width)
        assert info["shapes"]["stage_c_latents"] == [16, sem_h // 32, sem_w // 32]
        assert info["shapes"]["stage_a_latents"] == [4, height // 4, width // 4]
        assert info["shapes"]["images"] == [height, width, 3]
        files = [f for f in cache.manifest["files"] if f["bucket"] == bucket]
        assert sum(f["rows"] for f in files) == counts[bucket] and all(f["rows"] <= 4 for f in files)
        for path in cache.files_of(bucket):  # each file holds one bucket, at its fixed shapes
            table = pq.read_table(path, filesystem=cache.fs)
            assert set(table.column("bucket").to_pylist()) == {bucket}
            assert table.column("images").type.shape == [height, width, 3]
    rows = _rows(str(tmp_path / "cache"))
    assert {key: row["bucket"] for key, row in rows.items()} == expected
    per_shard = Counter(bucket for _, bucket in SIZES)  # every shard holds the SIZES images: data.shards' mix, by bucket
    assert [stats["buckets"] for stats in cache.manifest["shards"].values()] == [dict(per_shard)] * 4
    # The pixels are the source's centre at the bucket's shape (the largest part of its aspect ratio).
    for key in ("s0/img0", "s0/img6", "s1/img2"):
        shard, name = key.split("/")
        source = dict(good(key, 1000 + int(shard[1:]) * 100 + int(name[3:]), size=SIZES[int(name[3:])][0]))
        height, width = buckets.parse(expected[key])
        full, _ = training_pixels(decode_image(source[f"{key}.jpg"]), (height, width), semantic_image_size(height, width))
        assert rows[key]["images"].tobytes() == full.tobytes(), key
    assert all(f"bucket {b}" in format_summary(summary) for b in BUCKETS)  # the job's summary lists them

    with pytest.raises(ValueError, match=r"holds 3 aspect-ratio buckets, whose tensor columns .* read one bucket at a time"):
        cache.read_table(["key", "stage_c_latents"])
    assert cache.read_table(["key", "caption"]).num_rows == len(expected)  # no tensor: any bucket at once
    square = load(PrepConfig, None, [s if not s.startswith("encode.buckets=") else "encode.buckets=square"
                                     for s in _sets(tmp_path / "src", tmp_path / "cache")])
    with pytest.raises(CacheMismatchError, match=r"holds the buckets \['160x96', '128x128', '96x160'\]; this run cuts images to \['128x128'\]"):
        run_prep(square)


def test_a_killed_bucketed_run_reruns_to_the_same_rows(ray_cluster, tmp_path):
    _source(tmp_path / "src", shards=5)
    run_prep(load(PrepConfig, None, _sets(tmp_path / "src", tmp_path / "reference")))
    output = tmp_path / "killed"
    kill_after_first_commit_and_rerun(_sets(tmp_path / "src", output), output, ray_cluster, shards=5)
    resumed, expected = _rows(str(output)), _rows(str(tmp_path / "reference"))
    assert sorted(resumed) == sorted(expected) and len(resumed) == 5 * len(SIZES)
    for key, row in expected.items():
        for name, value in row.items():
            assert np.array_equal(resumed[key][name], value), (key, name)
    assert Cache(str(output)).buckets == Cache(str(tmp_path / "reference")).buckets


def test_training_takes_single_bucket_batches_the_same_bucket_on_every_rank_and_validates_every_bucket(
        ray_cluster, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient
    from test_train import metric_history, train_config

    from pipelines import registry
    from pipelines.evaluate import evaluate_model
    from pipelines.register import register_stage_c
    from pipelines.train import run_training

    expected = _source(tmp_path / "src")
    sets = [s for s in _sets(tmp_path / "src", tmp_path / "cache") if not s.startswith(("encode.images", "encode.stage_a"))]
    run_prep(load(PrepConfig, None, sets))
    cache = Cache(str(tmp_path / "cache"))
    assert list(cache.buckets) == BUCKETS and "stage_a_latents" not in cache.buckets["128x128"]["shapes"]
    order = tmp_path / "order"
    cfg = train_config(str(tmp_path / "cache"), str(tmp_path / "runs"), mlflow_server, "buckets", **{
        "data.batch_size": 2, "steps": 12, "checkpoint.every_steps": 6, "validation.every_steps": 6,
        "data.order_log": str(order), "validation.retrieval_captions": 2})
    result, run_id = run_training(cfg)
    assert result.metrics["step"] == 12
    logs = {rank: [json.loads(line) for line in (order / f"rank{rank}.jsonl").read_text().splitlines()] for rank in (0, 1)}
    taken = {rank: [entry["keys"] for entry in entries if "keys" in entry] for rank, entries in logs.items()}
    assert len(taken[0]) == len(taken[1]) == 12, "the same steps on every rank"
    drawn = []
    for first, second in zip(taken[0], taken[1]):
        buckets_of = {expected[k] for k in first} | {expected[k] for k in second}
        assert len(buckets_of) == 1, f"a batch of one bucket, the same on both ranks: {first} {second}"
        drawn.append(buckets_of.pop())
    assert set(drawn) == set(BUCKETS), drawn  # (seeded: each bucket drawn in these 12 steps)
    for bucket in BUCKETS:  # every bucket validated, and the overall figure is their weighted mean
        assert [s for s, _ in metric_history(mlflow_server, run_id, f"val_loss_{bucket}_ema")] == [6, 12]
    last = {key: MlflowClient(mlflow_server).get_run(run_id).data.metrics[key]
            for key in ["val_loss_ema", *(f"val_loss_{b}_ema" for b in BUCKETS)]}
    assert min(last[f"val_loss_{b}_ema"] for b in BUCKETS) <= last["val_loss_ema"] <= max(last[f"val_loss_{b}_ema"] for b in BUCKETS)
    assert len(metric_history(mlflow_server, run_id, "val_train_retrieval_top10_ema")) == 2

    # Registered and evaluated as any version: each bucket on its own, then their mean.
    version = register_stage_c(mlflow_server, "bucketed", run_id=run_id)["version"]
    assert registry.model_config_of(f"models:/bucketed/{version}")["buckets"] == BUCKETS
    result = evaluate_model(f"models:/bucketed/{version}", tracking_uri=mlflow_server)
    held = {b: result.get(f"loss_{b}") for b in BUCKETS}
    assert all(v is not None and np.isfinite(v) for v in held.values()), result
    assert min(held.values()) <= result["val_loss"] <= max(held.values())
    assert result["rows"] == sum(1 for key in expected if is_validation(key, 0.2))  # every bucket's held-out rows


def test_the_aspect_buckets_fit_the_strides_and_the_pixel_budget():
    from stages.latents import semantic_image_size

    for resolution in (256, 512, 1024):
        names = buckets.aspect_buckets(resolution)
        assert len(names) == {256: 7, 512: 9, 1024: 11}[resolution]  # fewer where neighbours round alike
        assert buckets.name(resolution, resolution) in names
        assert sorted(buckets.name(w, h) for h, w in map(buckets.parse, names)) == sorted(names)  # transposes too
        for bucket in names:
            height, width = buckets.parse(bucket)
            assert height % 32 == width % 32 == 0 and max(height, width) / min(height, width) <= 2.1  # 2:1, sides rounded
            assert abs(height * width / resolution**2 - 1) < 0.1, bucket  # sides rounded to 32
            sem_h, sem_w = semantic_image_size(height, width)
            assert sem_h % 32 == sem_w % 32 == 0
    assert buckets.aspect_buckets(1024)[0] == "1440x736" and buckets.aspect_buckets(1024)[-1] == "736x1440"
    assert buckets.resolve("square", 256) == ["256x256"]
    with pytest.raises(ValueError, match="must be multiples of 32"):
        buckets.resolve(["256x256", "250x262"], 256)
    with pytest.raises(ValueError, match="not within a quarter"):
        buckets.resolve(["256x256", "512x256"], 256)
    with pytest.raises(ValueError, match="must hold the square 256x256"):
        buckets.resolve(["224x288"], 256)
    with pytest.raises(ValueError, match="must be 'square', 'aspect' or a list"):
        buckets.resolve("wide", 256)
    assert buckets.nearest(["160x96", "128x128", "96x160"], 100, 100) == "128x128"


def test_a_square_bucket_is_cut_as_the_centre_square_was():
    """cover_crop_resize at a square is the centre square, resampled as before buckets existed (the
    square caches' latents stay what they were)."""
    from PIL import Image

    from data_prep.transforms import cover_crop_resize

    rng = np.random.default_rng(0)
    for size in ((97, 61), (61, 97), (80, 80)):
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        m = min(size)
        box = ((size[0] - m) / 2, (size[1] - m) / 2, (size[0] + m) / 2, (size[1] + m) / 2)
        before = image.resize((48, 48), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
        assert np.array_equal(np.asarray(cover_crop_resize(image, 48, 48)), np.asarray(before)), size
        wide = np.asarray(cover_crop_resize(image, 32, 64))
        assert wide.shape == (32, 64, 3)


def test_a_mix_of_shards_counts_each_buckets_rows_from_the_manifest():
    """data.shards' mix (a retrain's new shards plus a replay share of the rest) bucket by bucket: from
    each shard's own counts, so a retrain whose new images are all wide knows the tall bucket has few
    rows; a cache written before the manifest had them spreads the shards' rows as the cache's."""
    from pipelines.train import mixed_rows

    shards = {"new": {"rows_written": 40, "buckets": {"96x160": 40}},
              "old": {"rows_written": 60, "buckets": {"160x96": 30, "96x160": 30}}}
    cache = SimpleNamespace(manifest={"shards": shards}, rows=100,
                            buckets={"160x96": {"rows": 30}, "96x160": {"rows": 70}})
    assert mixed_rows(cache, None, 0.5) == {"160x96": 30, "96x160": 70}
    assert mixed_rows(cache, ["new"], 0.5) == {"160x96": 15, "96x160": 40 + 15}
    assert mixed_rows(cache, ["old"], 0.0) == {"160x96": 30, "96x160": 30}
    for stats in shards.values():
        del stats["buckets"]
    assert mixed_rows(cache, ["new"], 0.5) == pytest.approx({"160x96": 12 + 9, "96x160": 28 + 21})
