"""Data-prep throughput and cache size, side by side in one run.

    python -m benchmarks.prep_throughput [--images 1024 3072] [--encoders 1] [--encoder-cpus 2]

1. End to end: `run_prep` on webdataset shards of JPEGs (read, decode, filter, dedup, encode, write
   the cache), images/s over the whole run for two source sizes. The cluster is started first, and
   an unmeasured one-shard run starts Ray Data's own actors and task workers, so both measured runs
   pay the same per-run fixed costs (the encoder actors' start: a worker process, the torch,
   torchvision and transformers imports, the model builds and their fingerprints); the marginal
   rate between them, (N2 - N1) / (T2 - T1), is the throughput of the pipeline without those, what
   a long run gets.
2. The encoder-only bound, on the same machine with Ray shut down, measured before the runs and
   again after them (each layout keeps the better of its two figures): Encode in a tight loop
   on blocks of the source's JPEGs as the run gives them (it decodes and cuts them itself), with
   the run's batch size, three ways, and the best of them is the bound: one Encode with a job
   thread per core, running as many blocks at a time as in a run (the default layout); one
   single-threaded Encode process per core side by side; the networks on whole batches with a
   torch thread per core (how the encoders ran on CPU before they took one image per job, which a
   resumed run needs to reproduce an uninterrupted one bit for bit).
3. Where the larger run's CPU time goes (`cpu_accounting`): core-seconds and shares of the
   machine for the encoder actors, the read + decode task workers, the dedup actor, the driver
   (which also samples /proc every 0.5 s, ~1.5 ms a time), Ray's own processes and idle. The
   encoders at the bound's speed take `encoders_at_bound_share` of the machine, the whole-run ratio
   itself; what the encoder actors use beyond that is their start and their slowdown.
4. Cache size: bytes per sample on disk against the raw tensor payload, for both text modes, and the
   v2 shapes' payload per sample computed from the schema.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.cpu_accounting import CpuAccounting
from benchmarks.report import emit


SOURCE_SIZE = (320, 240)  # of the source's JPEGs


def _prep_factory():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import prep_factory

    return prep_factory


def _source(folder: Path, images: int, per_shard: int) -> Path:
    factory = _prep_factory()
    folder.mkdir(parents=True)
    for s in range(0, images, per_shard):
        members = []
        for i in range(s, min(images, s + per_shard)):
            members += factory.good(f"img{i:06d}", 10_000 + i, size=SOURCE_SIZE)
        factory.write_tar(folder / f"shard-{s // per_shard:04d}.tar", members)
    return folder


def _config(source: Path, output: Path, args, text_mode: str):
    from data_prep.config import PrepConfig
    from core.config import load

    return load(PrepConfig, None, [
        f"source.url={source}", "source.format=webdataset", f"output.url={output}",
        f"encode.flavor={args.flavor}", f"encode.resolution={args.resolution}", f"encode.batch_size={args.batch}",
        f"encode.text_mode={text_mode}", f"output.shards_per_wave={args.shards_per_wave}", "filters.dedup.exact=true",
        f"encode.num_encoders={args.encoders}", f"encode.cpus_per_encoder={args.encoder_cpus}",
    ])


def image_blocks(pictures: list[bytes], count: int, rows: int | None = None) -> list:
    """Blocks of kept samples as Encode gets them in a run: Arrow tables of `rows` rows (default
    DECODE_BATCH) whose image bytes are `pictures` in turn; the encoders' own batch size is the config's."""
    import pyarrow as pa

    from latent_cache.writer import KEEP
    from data_prep.operators import DECODE_BATCH

    n = rows or DECODE_BATCH

    def block(b: int):
        return pa.table({
            "key": [f"k{i}" for i in range(n)],
            "caption": [f"picture number {i}" for i in range(n)],
            "drop_reason": [KEEP] * n,
            "image_bytes": [pictures[(b * n + i) % len(pictures)] for i in range(n)],
        })

    return [block(b) for b in range(count)]


def run_ratios(runs: dict[int, dict], bound: float) -> dict:
    """Whole-run and marginal images/s of two run sizes, and each as a ratio to the bound."""
    (n1, r1), (n2, r2) = sorted(runs.items())
    marginal = (n2 - n1) / (r2["seconds"] - r1["seconds"])
    return {
        "whole_run": {str(n): {**r, "images_per_s": r["images"] / r["seconds"]} for n, r in runs.items()},
        "marginal_images_per_s": marginal,
        "encoder_only_images_per_s": bound,
        "ratio_whole_run_over_bound": {str(n): r["images"] / r["seconds"] / bound for n, r in runs.items()},
        "ratio_marginal_over_bound": marginal / bound,
    }


def cpu_shares(report: dict, images: int, bound: float) -> dict:
    """The run's CPU time per part as shares of the machine's (wall x cores) and in ms per image,
    and the encoder actors' time beyond what the encoders need at the bound's speed (their start,
    and their slowdown beside the rest of the run)."""
    machine = report["machine_core_seconds"]
    at_bound = images / bound * os.cpu_count()
    parts = dict(report["core_seconds"], idle=report["idle_core_seconds"])
    return {
        **report,
        "share_of_machine": {k: round(v / machine, 4) for k, v in parts.items()},
        "ms_per_image": {k: round(v / images * 1e3, 3) for k, v in parts.items()},
        "encoders_at_bound_share": round(at_bound / machine, 4),
        "encoder_actors_beyond_bound_core_seconds": round(report["core_seconds"].get("encoder_actors", 0.0) - at_bound, 2),
    }


def _encode_loop(cfg, batches: int, batched: bool, barrier=None) -> tuple[float, float, int]:
    """(start, end, images) of Encode called in a tight loop; `batched`: its networks called on
    whole batches instead (what it did on CPU before it took one image per call)."""
    from data_prep.operators import Encode

    stage = Encode(cfg.encode, cfg.filters.max_pixels)
    factory = _prep_factory()
    inputs = image_blocks([factory.image_bytes(10_000 + i, SOURCE_SIZE) for i in range(64)], batches + 1)

    if batched:
        import torch

        torch.set_num_threads(cfg.encode.cpus_per_encoder)  # Encode set one thread for its jobs

    def encode(b):
        if not batched:
            return stage(b)
        import torch

        squares = np.stack([stage.cut(data)["semantic_images"] for data in b.column("image_bytes").to_pylist()])
        with torch.no_grad():
            stage.semantic(torch.from_numpy(squares).permute(0, 3, 1, 2).float().div_(255.0))
            stage.text(*stage.text.tokenize(b.column("caption").to_pylist()))

    encode(inputs[0])  # warm-up
    if barrier is not None:
        barrier.wait()
    start = time.perf_counter()
    if batched:
        for b in inputs[1:]:
            encode(b)
    else:  # as many blocks at a time on the stage's job threads as a CPU encoder actor runs
        from concurrent.futures import ThreadPoolExecutor

        from data_prep.operators import ENCODER_CALLS

        with ThreadPoolExecutor(ENCODER_CALLS) as calls:
            list(calls.map(encode, inputs[1:]))
    return start, time.perf_counter(), sum(b.num_rows for b in inputs[1:])


def _encode_process(cfg, batches: int, barrier, results) -> None:
    results.put(_encode_loop(cfg, batches, batched=False, barrier=barrier))


def encoder_bounds(cfg, batches: int, cpus: int) -> dict[str, float]:
    """Images/s of Encode alone (decoding and cutting the source's JPEGs, then encoding them; the
    run's batch size), on this machine's `cpus` cores, three ways: one Encode with `cpus` job threads; `cpus` single-threaded
    Encode processes side by side; and the networks on whole batches with `cpus` torch threads
    (how Encode ran on CPU before it took one image per job, which a resumed run needs to
    reproduce an uninterrupted one bit for bit)."""
    import dataclasses
    import multiprocessing

    def layout(threads: int):
        return dataclasses.replace(cfg, encode=dataclasses.replace(cfg.encode, cpus_per_encoder=threads))

    start, end, images = _encode_loop(layout(cpus), batches, batched=False)
    bounds = {f"1_encoder_x_{cpus}_threads": images / (end - start)}
    start, end, images = _encode_loop(layout(cpus), batches, batched=True)
    bounds[f"whole_batches_{cpus}_threads"] = images / (end - start)
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(cpus), context.Queue()
    workers = [context.Process(target=_encode_process, args=(layout(1), batches, barrier, results)) for _ in range(cpus)]
    for w in workers:
        w.start()
    spans = [results.get() for _ in workers]
    for w in workers:
        w.join()
    bounds[f"{cpus}_encoders_x_1_thread"] = sum(n for _, _, n in spans) / (max(e for _, e, _ in spans) - min(s for s, _, _ in spans))
    return bounds


def cache_bytes(url: str) -> dict:
    from latent_cache.reader import Cache

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
    parser.add_argument("--encoders", type=int, default=1, help="encoder actors")
    parser.add_argument("--encoder-cpus", type=int, default=2, help="CPUs (job threads) of each encoder actor")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import ray

    from data_prep.runner import run_prep

    # The bound is measured before the runs and again after them, and each layout keeps its better
    # figure: a machine that slows down for a while (a noisy neighbour) must not lower the bound.
    encode_cfg = _config(Path("unused"), Path("unused"), args, "embeddings")
    bounds_before = encoder_bounds(encode_cfg, batches=16, cpus=os.cpu_count())
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    results = {"flavor": args.flavor, "resolution": args.resolution, "batch": args.batch, "encoders": args.encoders,
               "cpus_per_encoder": args.encoder_cpus,
               "shards_per_wave": args.shards_per_wave, "images_per_shard": args.per_shard}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_prep(_config(_source(tmp / "src-warm-up", args.per_shard, args.per_shard), tmp / "cache-warm-up", args, "embeddings"))
        runs, cpu = {}, {}
        for n in args.images:
            source = _source(tmp / f"src-{n}", n, args.per_shard)
            cfg = _config(source, tmp / f"cache-{n}", args, "embeddings")
            with CpuAccounting() as cpu[n]:
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
    bounds_after = encoder_bounds(encode_cfg, batches=16, cpus=os.cpu_count())
    bounds = {layout: max(bounds_before[layout], bounds_after[layout]) for layout in bounds_before}
    results["encoder_only_images_per_s_by_layout"] = bounds
    results["encoder_only_measurements"] = {"before_the_runs": bounds_before, "after_the_runs": bounds_after}
    results.update(run_ratios(runs, max(bounds.values())))
    larger = max(runs)
    results["cpu_of_the_larger_run"] = cpu_shares(cpu[larger].report(), runs[larger]["images"], max(bounds.values()))
    results["cache"] = sizes
    results["v2_payload_kib_per_sample"] = v2_payload_kib()
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
