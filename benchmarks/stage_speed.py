"""Forward + backward time of our StageC / StageB against diffusers' WuerstchenPrior / WuerstchenDiffNeXt
with the same weights and the same inputs, side by side in one process, reported as ratios.

    python -m benchmarks.stage_speed                       # small flavors on the CPU
    python -m benchmarks.stage_speed --device cuda --flavor v2 --dtype bf16 --batch 8

Runs alternate (ours, theirs, ours, ...) so that drift of the machine hits both alike; the median of
the timed repeats is reported. diffusers' prior is measured as shipped (its __init__ sets the classic
AttnProcessor) and, for reference, with the scaled_dot_product_attention processor.
"""

import argparse
import dataclasses
import statistics
import time

import torch

from benchmarks.report import emit
from stages import StageB, StageC


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model, inputs, device, dtype) -> float:
    model.zero_grad(set_to_none=True)
    _sync(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(*inputs)
    out.float().square().mean().backward()
    _sync(device)
    return time.perf_counter() - start


def compare(models: dict, inputs, device, dtype, warmup: int, repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        for model in models.values():
            _step(model, inputs, device, dtype)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(_step(model, inputs, device, dtype))
    return {name: statistics.median(t) for name, t in times.items()}


def diffusers_copy(ours, theirs_cls, device):
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(ours.config).items()}
    theirs = theirs_cls(**config).to(device)
    theirs.load_state_dict(ours.state_dict())
    return theirs


def main(argv: list[str] | None = None) -> int:
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenDiffNeXt, WuerstchenPrior

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--latent", type=int, default=24, help="Stage C latent side (24 = 1024 px)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    results = {"device": str(device), "flavor": args.flavor, "dtype": args.dtype, "batch": args.batch,
               "threads": torch.get_num_threads()}

    ours = StageC.from_flavor(args.flavor, dropout=0.0).to(device).train()
    theirs = diffusers_copy(ours, WuerstchenPrior, device).train()
    theirs_sdpa = diffusers_copy(ours, WuerstchenPrior, device).train()
    theirs_sdpa.set_attn_processor(AttnProcessor2_0())
    b, s = args.batch, args.latent
    inputs = (torch.randn(b, 16, s, s, device=device), torch.rand(b, device=device),
              torch.randn(b, 77, ours.config.c_cond, device=device))
    t = compare({"ours": ours, "diffusers": theirs, "diffusers_sdpa": theirs_sdpa}, inputs, device, dtype,
                args.warmup, args.repeats)
    results["stage_c"] = {**{f"{k}_s": v for k, v in t.items()}, "shape": list(inputs[0].shape),
                          "ratio_ours_over_diffusers": t["ours"] / t["diffusers"],
                          "ratio_ours_over_diffusers_sdpa": t["ours"] / t["diffusers_sdpa"]}
    del ours, theirs, theirs_sdpa

    ours = StageB.from_flavor(args.flavor, dropout=0.0).to(device).train()
    theirs = diffusers_copy(ours, WuerstchenDiffNeXt, device).train()
    side = int(s * 10.67)  # the Stage B latent for that image size (spec: latent_dim_scale 10.67)
    side -= side % (ours.config.patch_size * 2 ** (len(ours.config.c_hidden) - 1))
    b_batch = max(1, b // 4)
    inputs = (torch.randn(b_batch, 4, side, side, device=device), torch.rand(b_batch, device=device),
              torch.randn(b_batch, 16, s, s, device=device),
              torch.randn(b_batch, 77, ours.config.clip_embd, device=device))
    t = compare({"ours": ours, "diffusers": theirs}, inputs, device, dtype, args.warmup, args.repeats)
    results["stage_b"] = {**{f"{k}_s": v for k, v in t.items()}, "shape": list(inputs[0].shape),
                          "ratio_ours_over_diffusers": t["ours"] / t["diffusers"]}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
