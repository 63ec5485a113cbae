"""Ingest overhead of the Ray Train loop: samples/s of `pipelines.train` (1 worker, reading the
parquet cache through Ray Data) against a bare PyTorch loop on the same model, batch and objective
with the tensors already in memory, side by side in one run.

    python -m benchmarks.train_ingest [--rows 2048] [--steps 60] [--batch 32] [--flavor small]

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


def write_cache(root: Path, rows: int, flavor: str) -> str:
    from core.config import load
    from data_prep.config import PrepConfig
    from latent_cache import manifest as manifests
    from latent_cache.encoders import spec_fingerprints

    cfg = load(PrepConfig, None, [f"encode.flavor={flavor}", f"output.url={root}"])
    spec = cfg.encode.spec()
    encoders, width = spec_fingerprints(spec)
    shapes = spec.tensor_shapes(width)
    rng = np.random.default_rng(0)
    table = pa.table({
        "key": [f"k{i:07d}" for i in range(rows)],
        "stage_c_latents": pa.FixedShapeTensorArray.from_numpy_ndarray(
            ((rng.standard_normal((rows, *shapes["stage_c_latents"])) + 1) / 42).astype(np.float16)),
        "text_embeddings": pa.FixedShapeTensorArray.from_numpy_ndarray(
            rng.standard_normal((rows, *shapes["text_embeddings"])).astype(np.float16)),
    })
    (root / "data").mkdir(parents=True)
    pq.write_table(table, root / "data" / "part-0.parquet")
    manifest = manifests.new_manifest(spec, encoders, width, provenance={})
    manifests.record_wave(manifest, {"bench": {"rows_in": rows, "rows_written": rows, "dropped": {}}},
                         [{"path": "data/part-0.parquet", "rows": rows, "bytes": 0}])
    (root / manifests.MANIFEST).write_text(json.dumps(manifest))
    return str(root)


def bare_loop(cfg, cache_url: str, steps: int) -> float:
    """Samples/s of the same model, objective, optimizer and EMA on in-memory tensors."""
    from latent_cache.reader import Cache
    from pipelines.training.ema import Ema
    from stages.objectives import stage_c_loss

    torch.manual_seed(0)
    table = Cache(cache_url).read_table(["stage_c_latents", "text_embeddings"])
    b = cfg.data.batch_size
    z = torch.from_numpy(table.column("stage_c_latents").chunk(0).to_numpy_ndarray()[:b].astype(np.float32))
    text = torch.from_numpy(table.column("text_embeddings").chunk(0).to_numpy_ndarray()[:b].astype(np.float32))
    model = cfg.model.build().train()
    ema = Ema(model, cfg.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    empty = torch.zeros(1, *text.shape[1:])
    times = []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        stage_c_loss(model, z, text, empty, cfg.objective).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        ema.update(model, step)
        times.append(time.perf_counter() - start)
    return b / statistics.median(times[steps // 5:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs (torch threads) of the one worker and of the bare loop")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import ray
    from mlflow.tracking import MlflowClient

    from core.config import load
    from pipelines.train import run_training
    from pipelines.training.config import TrainConfig

    torch.set_num_threads(args.cpus)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = write_cache(tmp / "cache", args.rows, args.flavor)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        cfg = load(TrainConfig, None, [
            f"model.flavor={args.flavor}", f"data.cache={cache}", f"data.batch_size={args.batch}", f"steps={args.steps}",
            f"checkpoint.storage_path={tmp / 'runs'}", f"checkpoint.every_steps={args.steps}", f"validation.every_steps={args.steps}",
            "data.validation_fraction=0.01", "parallel.num_workers=1", f"parallel.cpus_per_worker={args.cpus}",
            f"tracking.tracking_uri={uri}", "tracking.log_every=1", "objective.caption_dropout=0.0",
        ])
        ray.init(num_cpus=args.cpus + 2, include_dashboard=False, log_to_driver=False)
        _, run_id = run_training(cfg)
        ray.shutdown()
        client = MlflowClient(uri)
        skip = args.steps // 5  # warm-up
        sps = [m.value for m in client.get_metric_history(run_id, "samples_per_s") if m.step > skip]
        wait = [m.value for m in client.get_metric_history(run_id, "data_wait_fraction") if m.step > skip]
        ray_sps = statistics.median(sps)
        bare_sps = bare_loop(cfg, cache, args.steps)
    results = {
        "flavor": args.flavor, "batch": args.batch, "cpus": args.cpus, "steps": args.steps,
        "ray_train_samples_per_s": ray_sps, "bare_loop_samples_per_s": bare_sps,
        "ratio_ray_over_bare": ray_sps / bare_sps, "data_wait_fraction_median": statistics.median(wait),
        "data_wait_fraction_mean": statistics.mean(wait),
    }
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
