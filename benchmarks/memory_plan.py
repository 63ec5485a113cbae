"""The memory plan (`wuerstchen plan`, pipelines/training/memory.py) against the peak that two real
training steps of the same run take on a GPU: TrainState.build and train_step, as a worker runs them,
on random batches of the cache's shapes. The plan's error is the figure the README states.

    python -m benchmarks.memory_plan --device cuda --flavor v2 --batch 32 --checkpointing full [--lora-rank 4]

On a CPU it prints the plan only (tests/test_memory_plan.py measures the CPU's heap instead).
"""

import argparse
import json
import time

import numpy as np
import torch


class _ListShard:
    """A worker's dataset shard holding `batches` (numpy dicts), the same every epoch."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def iter_batches(self, **kwargs):
        return iter(self.batches)


def config(sets: list[str]):
    from core.config import load
    from pipelines.training.config import TrainConfig

    return load(TrainConfig, None, ["objective.caption_dropout=0.05", *sets])


def shapes_of(cfg, side: int) -> dict[str, list[int]]:
    """A Stage C cache's tensor shapes at a latent side (24: 1024 px)."""
    from stages import StageC

    return {"stage_c_latents": [16, side, side], "text_embeddings": [77, StageC.flavor_config(cfg.model.flavor).c_cond]}


def train_steps(cfg, shapes: dict, device: torch.device, rank: int = 0, steps: int = 2) -> None:
    """`steps` real training steps of `cfg` (a Stage C embeddings run) on random batches of `shapes`."""
    from pipelines.training.data import EqualStepBatches
    from pipelines.training.loop import train_step
    from pipelines.training.state import TrainState
    from pipelines.training.tasks import StageCTask

    b = cfg.data.batch_size
    rng = np.random.default_rng(rank)
    batch = {"key": np.array([f"k{i}" for i in range(b)], dtype=object),
             **{name: rng.standard_normal((b, *shape)).astype(np.float16) for name, shape in shapes.items()}}
    empty = np.zeros(shapes["text_embeddings"], np.float32)
    task = StageCTask(cfg.model, cfg.encoders, cfg.objective, cfg.validation, "embeddings", empty).setup(device)
    torch.manual_seed(0)
    batches = EqualStepBatches(_ListShard([batch]), b, device)
    state = TrainState.build(cfg.model.build(), batches, cfg, device)
    for _ in range(steps):
        train_step(state, task, cfg, rank)


def main(argv: list[str] | None = None) -> int:
    from pipelines.training.memory import estimate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--flavor", default="v2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--checkpointing", default="full")
    parser.add_argument("--side", type=int, default=24)
    parser.add_argument("--lora-rank", type=int, default=None)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sets = [f"model.flavor={args.flavor}", f"data.batch_size={args.batch}", f"model.activation_checkpointing={args.checkpointing}",
            "parallel.num_workers=1", f"parallel.use_gpu={device.type == 'cuda'}"]
    if args.lora_rank:
        sets += ["model.init=base", f"model.lora.rank={args.lora_rank}"]
    cfg = config(sets)
    shapes = shapes_of(cfg, args.side)
    start = time.perf_counter()
    plan = estimate(cfg, shapes, gpus=1)
    out = {"sets": sets, "side": args.side, "plan_gib": plan.total / 2**30, "plan_parts_gib":
           {k: v / 2**30 for k, v in plan.parts.items()}, "plan_seconds": time.perf_counter() - start}
    print(plan.describe(), flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        train_steps(cfg, shapes, device)
        torch.cuda.synchronize(device)
        measured = torch.cuda.max_memory_allocated(device) - base
        out.update(gpu=torch.cuda.get_device_name(device), measured_gib=measured / 2**30,
                   error=(plan.total - measured) / measured)
    line = json.dumps(out)
    print(line, flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
