"""Checks that need a GPU, in one short run: v2-size parity with diffusers on CUDA (fp32, TF32 off),
the bf16-autocast error against fp32, and the peak memory of Stage C forward + backward with and
without activation checkpointing (none, selective, full).

    python -m benchmarks.gpu_check --device cuda --flavor v2
"""

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.stage_speed import diffusers_copy
from stages import StageA, StageB, StageC

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import randomize_  # noqa: E402

from benchmarks.report import emit


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def parity(flavor: str, device: torch.device, only_stage_c: bool = False) -> dict:
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {}
    gen = torch.Generator(device="cpu").manual_seed(0)

    # The prior's output (x - a) / (|1 - b| + 1e-5) amplifies any rounding where b is near 1, and random
    # weights put some b there: the head's output (a, b) is the well-conditioned thing to compare.
    ours = randomize_(StageC.from_flavor(flavor), seed=1, std=0.02).to(device).eval()
    theirs = diffusers_copy(ours, WuerstchenPrior, device).eval()
    theirs_sdpa = diffusers_copy(ours, WuerstchenPrior, device).eval()
    theirs_sdpa.set_attn_processor(AttnProcessor2_0())
    heads = {}
    for name, model in [("ours", ours), ("theirs", theirs), ("theirs_sdpa", theirs_sdpa)]:
        model.out.register_forward_hook(lambda m, i, o, name=name: heads.__setitem__(name, o))
    x = torch.randn(2, 16, 24, 24, generator=gen).to(device)
    r = torch.rand(2, generator=gen).to(device)
    c = torch.randn(2, 77, ours.config.c_cond, generator=gen).to(device)
    with torch.no_grad():
        ref, ref_sdpa, mine = theirs(x, r, c), theirs_sdpa(x, r, c), ours(x, r, c)
        mine_head = heads["ours"]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            ours(x, r, c)
    out["stage_c"] = {
        "head_max_rel_fp32_vs_diffusers": _max_rel(mine_head, heads["theirs"]),
        "head_max_rel_fp32_vs_diffusers_sdpa": _max_rel(mine_head, heads["theirs_sdpa"]),
        "eps_max_rel_fp32_vs_diffusers_sdpa": _max_rel(mine, ref_sdpa),
        "eps_max_rel_fp32_vs_diffusers": _max_rel(mine, ref),
        "head_max_rel_bf16_vs_fp32": _max_rel(heads["ours"], mine_head),
    }
    del ours, theirs, theirs_sdpa
    if only_stage_c:
        return out

    ours = randomize_(StageB.from_flavor(flavor), seed=2, std=0.02).to(device).eval()
    theirs = diffusers_copy(ours, WuerstchenDiffNeXt, device).eval()
    side = 128
    x = torch.randn(1, 4, side, side, generator=gen).to(device)
    e = torch.randn(1, 16, 12, 12, generator=gen).to(device)
    clip = torch.randn(1, 77, ours.config.clip_embd, generator=gen).to(device)
    r = r[:1]
    with torch.no_grad():
        ref = theirs(x, r, e, clip)
        mine = ours(x, r, e, clip)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            mine_bf16 = ours(x, r, e, clip)
    out["stage_b"] = {"max_abs_diff_fp32": (mine - ref).abs().max().item(), "max_rel_fp32": _max_rel(mine, ref),
                      "max_rel_bf16_vs_fp32": _max_rel(mine_bf16, mine), "finite_bf16": bool(mine_bf16.isfinite().all())}
    del ours, theirs

    ours = randomize_(StageA.from_flavor(flavor), seed=3, std=0.02).to(device).eval()
    theirs = diffusers_copy(ours, PaellaVQModel, device).eval()
    images = torch.rand(1, 3, 512, 512, generator=gen).to(device)
    with torch.no_grad():
        h = ours.encode(images)
        out["stage_a"] = {
            "encode_max_abs_diff": (h - theirs.encode(images).latents).abs().max().item(),
            "decode_max_abs_diff": (ours.decode(h) - theirs.decode(h).sample).abs().max().item(),
        }
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return out


def checkpointing_memory(flavor: str, device: torch.device, batch: int) -> dict:
    """Peak memory of one bf16 forward + backward above the weights, per activation checkpointing mode."""
    from pipelines.training.regions import ACTIVATION_CHECKPOINTING, prepare_blocks

    out = {"batch": batch}
    for mode in ACTIVATION_CHECKPOINTING:
        torch.manual_seed(0)
        model = prepare_blocks(StageC.from_flavor(flavor), mode).to(device).train()
        x = torch.randn(batch, 16, 24, 24, device=device)
        r = torch.rand(batch, device=device)
        c = torch.randn(batch, 77, model.config.c_cond, device=device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(x, r, c).float().square().mean()
        loss.backward()
        torch.cuda.synchronize(device)
        out[mode] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        del model, loss
    out["unit"] = "GiB above the weights"
    out["ratio_selective_over_none"] = out["selective"] / out["none"]
    out["ratio_full_over_none"] = out["full"] / out["none"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--flavor", default="v2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--only-stage-c-parity", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = {"torch": torch.__version__, "parity": parity(args.flavor, device, args.only_stage_c_parity)}
    if device.type == "cuda" and not args.only_stage_c_parity:
        results["gpu"] = torch.cuda.get_device_name(device)
        results["stage_c_memory"] = checkpointing_memory(args.flavor, device, args.batch)
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
