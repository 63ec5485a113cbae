"""Bytes per image that data prep puts through Ray's object store, per operator, from Ray Data's own
stats; with `--baseline REV`, beside the same measurement of another revision of the code, in one run.

    python -m benchmarks.prep_object_store [--images 128] [--source-size 1280 960] [--grain 0]
                                           [--baseline 7435dee]

The prep line (`data_prep.operators.prep_dataset`: read -> decode + filter -> deduplicate -> encode)
runs over webdataset shards of JPEGs (the pictures of `benchmarks.prep_gpu`; `--grain 20` makes
their JPEGs the size of photos', ~440 KB at 1280x960) on a local Ray cluster, with the tiny
encoders at the v2 run's sizes (1024 px, Stage A on): what an operator outputs depends on the
sizes, not on the encoders' widths. Every operator's output blocks go into the object store and
are fetched from there by the next operator (the last one's by the driver), so an operator's output
bytes (`Dataset.get_stats_summary()`, the figures `Dataset.stats()` prints) are what it puts
through the store. Reported per operator and in total, per source image, beside the source's bytes
per image and the decoded pixels per image that the encoders take (the training-resolution square
and the semantic compressor's square).

Each measurement runs in a child process on the same source. `--baseline REV` exports that
revision of this repository (`git archive`) and runs the child on its code (PYTHONPATH, which the
local cluster's workers inherit). 7435dee is the last revision whose decode tasks passed decoded
pixels on to the encoders.
"""

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _config(source: Path, output: Path, args):
    from core.config import load
    from data_prep.config import PrepConfig

    return load(PrepConfig, None, [
        f"source.url={source}", "source.format=webdataset", f"output.url={output}", "encode.flavor=tiny",
        f"encode.resolution={args.resolution}", "encode.stage_a={}", f"encode.batch_size={args.batch}",
        f"encode.cpus_per_encoder={args.encoder_cpus}", "filters.dedup.exact=true",
    ])


def operator_outputs(ds) -> list[dict]:
    """Each executed operator of `ds`, upstream first: its name, output rows and output bytes."""
    def chain(summary):
        for parent in summary.parents:
            yield from chain(parent)
        yield summary

    return [{"operator": op.operator_name, "rows": op.output_num_rows.sum, "bytes": op.output_size_bytes.sum}
            for summary in chain(ds.get_stats_summary()) for op in summary.operators_stats]


def measure(source: Path, args) -> dict:
    """Runs the prep line of the code this process imports over `source` (without writing a cache);
    its images/s and per-operator outputs, as bytes per source image."""
    import ray

    from data_prep.operators import prep_dataset
    from data_prep.runner import plan_run

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(source, Path(tmp) / "cache", args)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            plan = plan_run(cfg)
            ds = prep_dataset(cfg, plan.source_fs, plan.pending, [])
            start = time.perf_counter()
            images = sum(b.num_rows for b in ds.iter_batches(batch_format="pyarrow", batch_size=None))
            seconds = time.perf_counter() - start
            operators = operator_outputs(ds)
        finally:
            ray.shutdown()
    return {
        "images": images, "images_per_s": round(images / seconds, 2),
        "object_store_bytes_per_image": round(sum(op["bytes"] for op in operators) / images),
        "by_operator": {op["operator"]: round(op["bytes"] / images) for op in operators},
    }


def _measure_in_child(source: Path, args, out: Path, code: Path) -> dict:
    """`measure` in a child process that imports the code under `code`."""
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", str(source), "--json", str(out),
               "--resolution", str(args.resolution), "--batch", str(args.batch), "--encoder-cpus", str(args.encoder_cpus)]
    subprocess.run(command, env={**os.environ, "PYTHONPATH": str(code)}, cwd=code, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def _export(revision: str, folder: Path) -> Path:
    """The files of `revision` of this repository, written under `folder`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def pixel_square_bytes(resolution: int) -> int:
    """The decoded pixels the encoders take per image (uint8 RGB): the training-resolution square
    (Stage A) and the semantic compressor's square."""
    from stages.latents import semantic_image_size

    semantic = semantic_image_size(resolution, resolution)[0]
    return 3 * (resolution**2 + semantic**2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--source-size", type=int, nargs=2, default=[1280, 960], metavar=("W", "H"))
    parser.add_argument("--grain", type=int, default=0, help="noise amplitude added to the pictures (0-255)")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--encoder-cpus", type=int, default=2)
    parser.add_argument("--baseline", metavar="REV", help="a git revision to measure beside the working tree")
    parser.add_argument("--measure", type=Path, metavar="SOURCE", help=argparse.SUPPRESS)  # the child's part
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from benchmarks.report import emit

    if args.measure is not None:
        emit(measure(args.measure, args), args.json)
        return 0

    from benchmarks.prep_gpu import write_source

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = write_source(tmp / "src", args.images, args.per_shard, tuple(args.source_size), first_seed=0, grain=args.grain)
        results = {
            "images": args.images, "source_size": args.source_size, "grain": args.grain, "resolution": args.resolution,
            "source_tar_bytes_per_image": round(sum(p.stat().st_size for p in source.glob("*.tar")) / args.images),
            "decoded_pixel_bytes_per_image": pixel_square_bytes(args.resolution),
            "working_tree": _measure_in_child(source, args, tmp / "working-tree.json", ROOT),
        }
        if args.baseline:
            baseline = _measure_in_child(source, args, tmp / "baseline.json", _export(args.baseline, tmp / "baseline"))
            results["baseline"] = {"revision": args.baseline, **baseline}
            results["ratio_baseline_over_working_tree"] = {
                "object_store_bytes_per_image": round(
                    baseline["object_store_bytes_per_image"] / results["working_tree"]["object_store_bytes_per_image"], 2),
                "by_operator": {name: round(baseline["by_operator"][name] / value, 2)
                                for name, value in results["working_tree"]["by_operator"].items()
                                if name in baseline["by_operator"] and value},
            }
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
