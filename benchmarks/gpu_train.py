"""Stage C training throughput on one GPU: the v2 flavor, bf16 autocast, FSDP2 (one rank), synthetic
24x24 latents with 77x1280 text conditioning. Prints samples/s, achieved TFLOP/s and MFU.

    python -m benchmarks.gpu_train [--batch 32] [--steps 10] [--peak-tflops 989]

FLOPs are counted from the shapes (matmuls and attention, forward x 3 for forward + backward;
depthwise convs, norms and elementwise ops are left out, so MFU is slightly understated). For
reference, the paper's 24,602 A100-hours for ~1.18B samples is about 13 samples/s per A100.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist

from benchmarks.report import emit
from stages import StageC
from stages.objectives import StageCObjective, stage_c_loss


def forward_flops(config, batch: int, h: int = 24, w: int = 24, text_tokens: int = 77) -> float:
    c, depth, n = config.c, config.depth, h * w
    macs = text_tokens * (config.c_cond * c + c * c)  # cond_mapper
    macs += n * config.c_in * c + n * c * 2 * config.c_in  # projection, out
    per_block = n * 8 * c * c  # ResBlock channelwise Linear c->4c->c
    per_block += text_tokens * c * c  # kv_mapper
    per_block += n * c * c + (n + text_tokens) * 2 * c * c + n * c * c  # q, k, v, out projections
    per_block += 2 * n * (n + text_tokens) * c  # scores and weighted sum
    per_block += config.c_r * 2 * c  # TimestepBlock
    return 2.0 * batch * (macs + depth * per_block)


def single_rank_group(device_type: str, port: int) -> torch.device:
    """A process group of this one process (FSDP2 needs one), on NCCL for "cuda" (TF32 matmuls on),
    else gloo; returns the device."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    cuda = device_type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    return device


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="v2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200 SXM)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of a small flavor")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    device = single_rank_group(args.device, port=29512)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    from pipelines.training.parallel import parallelize

    model = StageC.from_flavor(args.flavor)
    model.set_gradient_checkpointing(args.checkpointing)
    model = parallelize(model, "fsdp2", device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    objective = StageCObjective(caption_dropout=0.0)
    b = args.batch
    z_c = torch.randn(b, 16, 24, 24, device=device) * 0.024 + 0.024
    text = torch.randn(b, 77, model.config.c_cond, device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = stage_c_loss(model, z_c, text, None, objective)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss

    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    flops = 3.0 * forward_flops(model.config, b) * (4 / 3 if args.checkpointing else 1.0)
    tflops = flops / seconds / 1e12
    results = {
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__, "flavor": args.flavor, "batch": b,
        "gradient_checkpointing": args.checkpointing, "params": sum(p.numel() for p in model.parameters()),
        "step_s": seconds, "samples_per_s": b / seconds, "achieved_tflops": tflops,
        "mfu": tflops / args.peak_tflops, "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "reference_samples_per_s_per_a100_paper": 13.0,
    }
    emit(results, args.json)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
