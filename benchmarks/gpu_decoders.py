"""Decoder training throughput on one GPU: Stage B (the v2 decoder on Stage A latents of
`--resolution` images, conditioned on 16-channel semantic latents and 77 x clip_embd text) and Stage
A (the v2 VQGAN on `--resolution` images), each with the training task's loss, bf16 autocast and
FSDP2 (one rank), in one run. Prints samples/s, step time and peak memory of each.

    python -m benchmarks.gpu_decoders [--resolution 1024] [--batch-b 8] [--batch-a 8] [--steps 10]
    python -m benchmarks.gpu_decoders --device cpu --flavor tiny --resolution 128 --steps 2   # smoke run

No FLOP count: most of both models' work is convolutions and depthwise convolutions, whose FLOPs
are not what bounds them, so an MFU figure would mislead; samples/s and memory are what a run plan needs.
"""

import argparse
import time

import torch
import torch.distributed as dist

from benchmarks.gpu_train import single_rank_group
from benchmarks.report import emit
from stages import StageA, StageB
from stages.latents import semantic_image_size
from stages.objectives import StageAObjective, StageBObjective, stage_a_loss, stage_b_loss


def measure(model, loss_of, device: torch.device, warmup: int, steps: int) -> dict:
    """Seconds per optimizer step and peak memory of `loss_of(model)` trained with AdamW under FSDP2."""
    from pipelines.training.parallel import parallelize, sharding_units

    cuda = device.type == "cuda"
    model = parallelize(model, "fsdp2", device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = loss_of(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return {"params": sum(p.numel() for p in model.parameters()), "sharding_units": len(sharding_units(model)),
            "step_s": seconds, "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="v2")
    parser.add_argument("--resolution", type=int, default=1024, help="training image side")
    parser.add_argument("--batch-b", type=int, default=8)
    parser.add_argument("--batch-a", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of a small flavor")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    device = single_rank_group(args.device, port=29513)
    cuda = device.type == "cuda"
    r = args.resolution
    results = {"gpu": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
               "flavor": args.flavor, "resolution": r}

    stage_b = StageB.from_flavor(args.flavor)
    b = args.batch_b
    sem = [s // 32 for s in semantic_image_size(r, r)]
    h = torch.randn(b, 4, r // 4, r // 4, device=device) * 0.3764
    e = torch.randn(b, stage_b.config.effnet_embd, *sem, device=device)
    text = torch.randn(b, 77, stage_b.config.clip_embd, device=device)
    objective_b = StageBObjective(effnet_dropout=0.1)
    generator = torch.Generator().manual_seed(0)
    out = measure(stage_b, lambda m: stage_b_loss(m, h, e, text, objective_b, generator), device, args.warmup, args.steps)
    results["stage_b"] = {**out, "batch": b, "samples_per_s": b / out["step_s"]}
    del stage_b, h, e, text
    if cuda:
        torch.cuda.empty_cache()

    stage_a = StageA.from_flavor(args.flavor)
    images = torch.rand(args.batch_a, 3, r, r, device=device)
    out = measure(stage_a, lambda m: stage_a_loss(m, images, StageAObjective()), device, args.warmup, args.steps)
    results["stage_a"] = {**out, "batch": args.batch_a, "samples_per_s": args.batch_a / out["step_s"]}
    emit(results, args.json)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
