"""Ingest overhead of the Ray Train loop, epoch boundaries included: samples/s of `pipelines.train` (1
worker, reading the parquet cache through Ray Data) against a bare PyTorch loop on the same model, batch and objective
(the same training task) with the tensors already in memory, side by side in one run; for Stage C,
Stage B (`--stage b`: the decoder on Stage A latents) or Stage A (`--stage a`: the VQGAN on the
cache's uint8 images, 256 px).

    python -m benchmarks.train_ingest [--stage c] [--rows 512] [--epochs 5] [--batch 32] [--flavor small]

Two Ray runs span `--epochs` epochs of the cache: one streaming it through Ray Data every epoch
(data.memory_limit_mb=0), one with the worker's share held in memory, read from the cache's files in
process (the default for a small cache: train.reads_in_process). Each reports the median samples/s of single steps and the wall-clock rate over all steps
(epoch boundaries included), both as ratios to the bare loop.

The cache is written directly (random latents, the flavor's seeded encoders' fingerprints), so the
benchmark does not depend on data prep's speed.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.report import emit


# What a Stage B run adds to the cache and to the trainer's encoders (the decoder text tower with its own seed).
STAGE_B_PREP = ["encode.stage_a={}", "encode.decoder_text_encoder={seed: 1}"]
STAGE_B_TRAIN = ["model.stage=b", "encoders.stage_a={}", "encoders.decoder_text_encoder={seed: 1}"]
PREP = {"a": ["encode.images=true"], "b": STAGE_B_PREP, "c": []}
TRAIN = {"a": ["model.stage=a"], "b": STAGE_B_TRAIN, "c": []}


def write_cache(root: Path, rows: int, flavor: str, stage: str, prep_sets: tuple[str, ...] = ()) -> str:
    """A cache of `rows` random rows with every column the stage's task reads, and the manifest of the
    flavor's seeded encoders, or of those `prep_sets` name (so the trainer's fingerprint check passes)."""
    from core.config import load
    from data_prep.config import PrepConfig
    from latent_cache import manifest as manifests
    from latent_cache.encoders import spec_fingerprints
    from latent_cache.spec import decoder_text_width

    cfg = load(PrepConfig, None, [f"encode.flavor={flavor}", f"output.url={root}", *PREP[stage], *prep_sets])
    spec = cfg.encode.spec()
    encoders, width = spec_fingerprints(spec)
    shapes = spec.tensor_shapes(width, decoder_text_width(encoders))
    rng = np.random.default_rng(0)
    columns = {"key": [f"k{i:07d}" for i in range(rows)]}
    for name, shape in shapes.items():
        if name == "images":
            columns[name] = pa.FixedShapeTensorArray.from_numpy_ndarray(rng.integers(0, 256, (rows, *shape), np.uint8))
            continue
        values = rng.standard_normal((rows, *shape))
        if name == "stage_c_latents":
            values = (values + 1) / 42  # z_C of e ~ N(0, 1)
        elif name == "stage_a_latents":
            values = values * 0.3764  # z_B of unit variance
        columns[name] = pa.FixedShapeTensorArray.from_numpy_ndarray(values.astype(np.float16))
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.table(columns), root / "data" / "part-0.parquet")
    manifest = manifests.new_manifest(spec, encoders, width, provenance={})
    manifests.record_wave(manifest, {"bench": {"rows_in": rows, "rows_written": rows, "dropped": {}}},
                         [{"path": "data/part-0.parquet", "rows": rows, "bytes": 0}])
    (root / manifests.MANIFEST).write_text(json.dumps(manifest))
    return str(root)


def bare_loop(cfg, cache_url: str, steps: int) -> float:
    """Samples/s of the same model, task (objective), optimizer and EMA on in-memory tensors."""
    from latent_cache.reader import Cache
    from pipelines.train import build_task, expected_fingerprints
    from pipelines.training.data import to_tensors
    from pipelines.training.ema import Ema
    from pipelines.training.regions import prepare_blocks

    torch.manual_seed(0)
    cache = Cache(cache_url)
    task = build_task(cfg, cache, expected_fingerprints(cfg)[1]).setup(torch.device("cpu"))
    table = cache.read_table(task.columns).slice(0, cfg.data.batch_size)
    batch = to_tensors({name: (table.column(name).to_pylist() if name == "key" else table.column(name).chunk(0).to_numpy_ndarray())
                        for name in task.columns}, torch.device("cpu"))
    model = prepare_blocks(cfg.model.build(), cfg.model.activation_checkpointing, cfg.model.compile).train()
    ema = Ema(model, cfg.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    generator = torch.Generator().manual_seed(0)
    times = []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        task.loss(model, batch, generator).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        ema.update(model, step)
        times.append(time.perf_counter() - start)
    return cfg.data.batch_size / statistics.median(times[steps // 5:])


def ray_rates(client, run_id: str, steps: int, batch: int) -> dict:
    """From a run's logged steps (every `--log-every`): the median samples/s of single steps and the
    wall-clock rate over the steps after the warm-up fifth (epoch boundaries included), from the
    times the steps were logged. The last step, which also validates and checkpoints, is left out."""
    skip = steps // 5  # warm-up
    history = [m for m in client.get_metric_history(run_id, "samples_per_s") if skip < m.step < steps]
    wait = [m.value for m in client.get_metric_history(run_id, "data_wait_fraction") if m.step > skip]
    first, last = min(history, key=lambda m: m.step), max(history, key=lambda m: m.step)
    wall = (last.step - first.step) * batch / ((last.timestamp - first.timestamp) / 1000)
    return {"step_samples_per_s_median": statistics.median(m.value for m in history), "wall_samples_per_s": wall,
            "data_wait_fraction_median": statistics.median(wait), "data_wait_fraction_mean": statistics.mean(wait)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("c", "b", "a"), default="c", help="the model trained: Stage C, B or A")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=5, help="the runs span this many epochs of the training rows")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs (torch threads) of the one worker and of the bare loop")
    parser.add_argument("--log-every", type=int, default=5,
                        help="steps between logged steps (what the rates are read from; logging every step costs the loop time)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import ray
    from mlflow.tracking import MlflowClient

    from core.config import load
    from pipelines.train import run_training
    from pipelines.training.config import TrainConfig

    torch.set_num_threads(args.cpus)
    per_epoch = int(args.rows * 0.99) // args.batch  # steps an epoch (1% held out)
    steps = per_epoch * args.epochs + per_epoch // 2
    results = {"stage": args.stage, "flavor": args.flavor, "batch": args.batch, "cpus": args.cpus, "rows": args.rows,
               "steps": steps, "steps_per_epoch": per_epoch}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = write_cache(tmp / "cache", args.rows, args.flavor, args.stage)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        ray.init(num_cpus=args.cpus + 2, include_dashboard=False, log_to_driver=False)
        # Streaming re-reads the cache through Ray Data every epoch; in memory, each worker reads its
        # share once, in process (data.memory_limit_mb, the default for a cache this size).
        for mode, limit in (("streaming", 0), ("in_memory", 1024)):
            cfg = load(TrainConfig, None, [
                f"model.flavor={args.flavor}", f"data.cache={cache}", f"data.batch_size={args.batch}", f"steps={steps}",
                f"checkpoint.storage_path={tmp / 'runs'}", f"checkpoint.run_name={mode}", f"checkpoint.every_steps={steps}",
                f"validation.every_steps={steps}", "validation.retrieval_captions=0", "data.validation_fraction=0.01",
                f"data.memory_limit_mb={limit}", "parallel.num_workers=1", f"parallel.cpus_per_worker={args.cpus}",
                f"tracking.tracking_uri={uri}", f"tracking.log_every={args.log_every}", "objective.caption_dropout=0.0",
                *TRAIN[args.stage],
            ])
            _, run_id = run_training(cfg)
            results[mode] = ray_rates(MlflowClient(uri), run_id, steps, args.batch)
        ray.shutdown()
        bare_sps = bare_loop(cfg, cache, 60)
    results["bare_loop_samples_per_s"] = bare_sps
    for mode in ("streaming", "in_memory"):
        results[mode]["ratio_wall_over_bare"] = results[mode]["wall_samples_per_s"] / bare_sps
        results[mode]["ratio_step_over_bare"] = results[mode]["step_samples_per_s_median"] / bare_sps
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
