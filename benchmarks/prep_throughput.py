"""Data-prep throughput and cache size, side by side in one run.

    python -m benchmarks.prep_throughput [--images 1024 3072] [--flavor small] [--resolution 256]

1. End to end: `run_prep` on webdataset shards of JPEGs (read, decode, filter, dedup, encode, write),
   images/s over the whole run, Ray start excluded (the cluster is started first), for two source
   sizes; the marginal rate between them, (N2 - N1) / (T2 - T1), is the throughput without the
   fixed start-up costs (driver-side encoder fingerprints, the first actors' start).
2. The encoder-only bound: the same EncodeStage called in a tight loop on already-decoded pixels of
   the same batch size, on this machine, right after.
3. Cache size: bytes per sample on disk against the raw tensor payload, for both text modes, and the
   v2 shapes' payload per sample computed from the schema.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.report import emit


def _source(folder: Path, images: int, per_shard: int) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from prep_factory import good, write_tar

    folder.mkdir(parents=True)
    for s in range(0, images, per_shard):
        members = []
        for i in range(s, min(images, s + per_shard)):
            members += good(f"img{i:06d}", 10_000 + i, size=(320, 240))
        write_tar(folder / f"shard-{s // per_shard:04d}.tar", members)
    return folder


def _config(source: Path, output: Path, args, text_mode: str):
    from data_prep.config import PrepConfig
    from pipelines.config import load

    return load(PrepConfig, None, [
        f"source.url={source}", "source.format=webdataset", f"output.url={output}",
        f"encode.flavor={args.flavor}", f"encode.resolution={args.resolution}", f"encode.batch_size={args.batch}",
        f"encode.text_mode={text_mode}", f"output.shards_per_wave={args.shards_per_wave}", "filters.dedup.exact=true",
        f"encode.cpus_per_encoder={args.encoder_cpus}",
    ])


def encoder_bound(cfg, batches: int) -> float:
    """Images/s of EncodeStage alone on decoded pixels (the same batch size as the run)."""
    from data_prep.ray_stages import KEEP, EncodeStage
    from stages.latents import semantic_image_size

    stage = EncodeStage(cfg.encode)
    res, n = cfg.encode.resolution, cfg.encode.batch_size
    sem = semantic_image_size(res, res)[0]
    rng = np.random.default_rng(0)

    def batch():
        return {
            "key": np.array([f"k{i}" for i in range(n)], dtype=object),
            "caption": np.array([f"picture number {i}" for i in range(n)], dtype=object),
            "drop_reason": np.array([KEEP] * n, dtype=object),
            "pixels": np.array([rng.integers(0, 256, (res, res, 3), np.uint8).tobytes() for _ in range(n)], dtype=object),
            "semantic_pixels": np.array([rng.integers(0, 256, (sem, sem, 3), np.uint8).tobytes() for _ in range(n)], dtype=object),
        }

    inputs = [batch() for _ in range(batches)]
    stage(batch())  # warm-up
    start = time.perf_counter()
    for b in inputs:
        stage(b)
    return batches * n / (time.perf_counter() - start)


def cache_bytes(url: str) -> dict:
    from data_prep.cache import Cache

    cache = Cache(url)
    on_disk = sum(f["bytes"] for f in cache.manifest["files"])
    payload_per_row = sum(int(np.prod(shape)) * np.dtype(
        {"text_tokens": np.int32, "text_mask": np.int8}.get(name, np.float16)).itemsize
        for name, shape in cache.manifest["shapes"].items())
    rows = cache.rows
    return {"rows": rows, "bytes_per_row": on_disk / rows, "payload_per_row": payload_per_row,
            "ratio_disk_over_payload": on_disk / (rows * payload_per_row)}


def v2_payload_kib() -> dict:
    shapes = {"stage_c_latents": (16, 24, 24, 2), "stage_a_latents": (4, 256, 256, 2),
              "text_embeddings": (77, 1280, 2), "text_tokens+mask": (77 * 4 + 77,)}
    return {name: float(np.prod(s)) / 1024 for name, s in shapes.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs=2, default=[1024, 3072])
    parser.add_argument("--per-shard", type=int, default=128)
    parser.add_argument("--shards-per-wave", type=int, default=8)
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--encoder-cpus", type=int, default=2, help="CPUs (torch threads) of the encoder actor")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import ray

    from data_prep.runner import run_prep

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    results = {"flavor": args.flavor, "resolution": args.resolution, "batch": args.batch,
               "shards_per_wave": args.shards_per_wave, "images_per_shard": args.per_shard}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {}
        for n in args.images:
            source = _source(tmp / f"src-{n}", n, args.per_shard)
            cfg = _config(source, tmp / f"cache-{n}", args, "embeddings")
            start = time.perf_counter()
            summary = run_prep(cfg)
            runs[n] = {"seconds": time.perf_counter() - start, "images": summary["rows_in"]}
        small = args.images[0] // 2
        sizes = {}
        for mode in ("embeddings", "tokens"):
            source = _source(tmp / f"src-size-{mode}", small, args.per_shard)
            run_prep(_config(source, tmp / f"size-{mode}", args, mode))
            sizes[mode] = cache_bytes(str(tmp / f"size-{mode}"))
        ray.shutdown()
        bound = encoder_bound(_config(tmp / "src-size-tokens", tmp / "x", args, "embeddings"), batches=16)
    (n1, r1), (n2, r2) = sorted(runs.items())
    marginal = (n2 - n1) / (r2["seconds"] - r1["seconds"])
    results["whole_run"] = {str(n): {**r, "images_per_s": r["images"] / r["seconds"]} for n, r in runs.items()}
    results["marginal_images_per_s"] = marginal
    results["encoder_only_images_per_s"] = bound
    results["ratio_whole_run_over_bound"] = {str(n): r["images"] / r["seconds"] / bound for n, r in runs.items()}
    results["ratio_marginal_over_bound"] = marginal / bound
    results["cache"] = sizes
    results["v2_payload_kib_per_sample"] = v2_payload_kib()
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
