"""The real training job on one GPU under Ray against the bare loop, side by side in one run: samples/s
of `pipelines.train` (a local Ray cluster on the GPU node, one worker, the v2 flavor, on a synthetic
v2-shaped cache read through Ray Data) over the bare loop of `benchmarks/gpu_train.py` on the same
settings (model, batch, checkpointing, compile, FSDP2 with the bf16 policy). Goal: >= 0.95.

    python -m benchmarks.gpu_ray_train [--batch 32] [--steps 60] [--checkpointing none] [--compile] [--jsonl F]
    python -m benchmarks.gpu_ray_train --device cpu --flavor tiny --steps 12 --rows 256   # a smoke run

The cache's encoders are the v2 shapes with seeded random weights, written as the public checkpoints
come (`benchmarks/prep_gpu.write_v2_encoders`, a 2-layer text tower: training only fingerprints it in
embeddings mode); its rows are random latents and embeddings (`benchmarks/train_ingest.write_cache`).
The Ray rate is the wall-clock rate between the first logged step after the warm-up fifth and the last
logged step before the final one (which validates and writes the checkpoint).
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.gpu_train import _emit


def ray_rate(client, run_id: str, steps: int, batch: int) -> dict:
    skip = steps // 5
    history = sorted((m for m in client.get_metric_history(run_id, "samples_per_s") if skip < m.step < steps),
                     key=lambda m: m.step)
    first, last = history[0], history[-1]
    wall = (last.step - first.step) * batch / ((last.timestamp - first.timestamp) / 1000)
    waits = [m.value for m in client.get_metric_history(run_id, "data_wait_fraction") if skip < m.step < steps]
    return {"wall_samples_per_s": wall, "logged_samples_per_s_median": statistics.median(m.value for m in history),
            "data_wait_fraction_mean": statistics.mean(waits)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="v2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rows", type=int, default=1024, help="cache rows (in the worker's memory: no epoch stalls)")
    parser.add_argument("--checkpointing", default="none", choices=("none", "selective", "full"))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--strategy", default="fsdp2", choices=("ddp", "fsdp2"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cpus", type=int, default=8, help="CPUs of the Ray worker")
    parser.add_argument("--jsonl")
    args = parser.parse_args(argv)

    import ray
    import torch
    from mlflow.tracking import MlflowClient

    from benchmarks.gpu_train import Bench, Row, single_rank_group
    from benchmarks.train_ingest import write_cache
    from core.config import load
    from latent_cache.reader import Cache
    from pipelines.train import run_training
    from pipelines.training.config import TrainConfig

    cuda = args.device == "cuda"
    settings = {"flavor": args.flavor, "batch": args.batch, "steps": args.steps, "checkpointing": args.checkpointing,
                "compile": args.compile, "strategy": args.strategy, "device": args.device}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prep_sets, train_sets = [], []
        if args.flavor == "v2":
            from benchmarks.prep_gpu import write_v2_encoders
            from stages.text_encoders import write_clip_tokenizer_files

            weights = write_v2_encoders(tmp / "encoders", str(write_clip_tokenizer_files(tmp / "tokenizer")), 2, args.device)
            prep_sets = [f"encode.semantic.path={weights['semantic']}", f"encode.text_encoder.path={weights['text']}"]
            train_sets = [f"encoders.semantic.path={weights['semantic']}", f"encoders.text_encoder.path={weights['text']}"]
        started = time.perf_counter()
        cache = write_cache(tmp / "cache", args.rows, args.flavor, "c", tuple(prep_sets))
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        log_every = max(1, args.steps // 12)
        cfg = load(TrainConfig, None, [
            f"model.flavor={args.flavor}", f"model.activation_checkpointing={args.checkpointing}", f"model.compile={args.compile}",
            f"data.cache={cache}", f"data.batch_size={args.batch}", "data.validation_fraction=0.01", f"steps={args.steps}",
            f"checkpoint.storage_path={tmp / 'runs'}", "checkpoint.run_name=gpu", f"checkpoint.every_steps={args.steps}",
            f"validation.every_steps={args.steps}", "validation.retrieval_captions=0", "validation.t_grid=[0.5]",
            "objective.caption_dropout=0.0", "ema.mode=every_step", f"parallel.strategy={args.strategy}",
            "parallel.num_workers=1", f"parallel.use_gpu={cuda}", f"parallel.cpus_per_worker={args.cpus}",
            f"tracking.tracking_uri={uri}", f"tracking.log_every={log_every}", *train_sets,
        ])
        ray.init(num_cpus=args.cpus + 2, num_gpus=1 if cuda else 0, include_dashboard=False)
        _, run_id = run_training(cfg)
        ray.shutdown()
        ray_figures = ray_rate(MlflowClient(uri), run_id, args.steps, args.batch)
        ray_seconds = time.perf_counter() - started
        latent_side = Cache(cache).read_table(["stage_c_latents"]).column("stage_c_latents").type.shape[-1]

    torch.set_num_threads(args.cpus)  # as Ray gives its worker (OMP_NUM_THREADS = its CPUs)
    device = single_rank_group(args.device, port=29513)
    bench = Bench(args.flavor, device, steps=20, warmup=3, peak_tflops=989.0, latent_side=latent_side)
    bare = bench.run(Row("bare", batch=args.batch, checkpointing=args.checkpointing, compile=args.compile,
                         fsdp2=args.strategy == "fsdp2"))
    torch.distributed.destroy_process_group()
    _emit({"gpu_ray_train": settings, "ray": ray_figures, "ray_run_s": ray_seconds, "bare_samples_per_s": bare["samples_per_s"],
           "bare_mfu": bare["mfu"], "ratio_ray_over_bare": ray_figures["wall_samples_per_s"] / bare["samples_per_s"]},
          args.jsonl)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
