"""Stage C training throughput on one GPU, as a matrix of settings: one JSON line per row, printed
(and appended to `--jsonl`) as soon as the row is measured, the rows in order of importance, and
the matrix stopping itself before `--deadline-s`.

    python -m benchmarks.gpu_train [--rows all] [--deadline-s 300] [--jsonl rows.jsonl] [--peak-tflops 989]
    python -m benchmarks.gpu_train --device cpu --flavor tiny --rows base,fsdp2_bf16 --steps 2   # a smoke run

Every row runs the real training step's parts (pipelines/training: the blocks prepared by
`regions.prepare_blocks`, `parallel.parallelize`, bf16 autocast, the task's loss, fused AdamW, the
gradient clip and the EMA's foreach update) on synthetic v2-shaped data (z_C 16x24x24, 77 text
tokens) and reports samples/s, step time and peak memory. Rows: `base` (eager, no FSDP, batch 32),
`fsdp2_bf16` (FSDP2 on one rank with the bf16 policy), `compiled`, `compiled_fsdp2_bf16`, batch
32/64/128 with none/selective/full activation checkpointing (`b64_selective`, ...), the attention
backends (`attn_flash`, `attn_efficient`, `attn_cudnn`, `attn_math`), `tokens` (the frozen ViT-bigG
text tower run inside the step on cached tokens, as tokens mode does) and `profile` (the top CUDA
kernels, and their time by category).

FLOPs are counted, not estimated: `torch.utils.flop_counter.FlopCounterMode` over one step of the
eager model. Model FLOPs: the step without activation checkpointing (what the step computes);
hardware FLOPs: with the row's checkpointing (its recompute included). MFU = model FLOPs/s over the
GPU's dense bf16 peak; HFU the same with hardware FLOPs. For reference, the paper's 24,602 A100-hours
for ~1.18B samples is about 13 samples/s per A100.
"""

import argparse
import contextlib
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

BIGG = {"width": 1280, "layers": 32, "heads": 20}  # the v2 prior's text tower (CLIP ViT-bigG/14)
TEXT_TOKENS = 77


@dataclass(frozen=True)
class Row:
    name: str
    batch: int = 32
    checkpointing: str = "none"
    compile: bool = False
    fsdp2: bool = False
    attention: str | None = None  # None: PyTorch's choice
    tokens: bool = False
    profile: bool = False


def matrix() -> list[Row]:
    """The rows, most telling first (the deadline cuts from the end)."""
    rows = [Row("base"), Row("fsdp2_bf16", fsdp2=True), Row("compiled", compile=True),
            Row("compiled_fsdp2_bf16", compile=True, fsdp2=True), Row("tokens", tokens=True)]
    for batch in (64, 128):
        for mode in ("selective", "full", "none"):
            rows.append(Row(f"b{batch}_{mode}", batch=batch, checkpointing=mode, fsdp2=True))
    rows += [Row("b32_selective", checkpointing="selective", fsdp2=True),
             Row("b64_selective_compiled", batch=64, checkpointing="selective", compile=True, fsdp2=True)]
    rows += [Row(f"attn_{backend}", attention=backend) for backend in ("flash", "efficient", "cudnn", "math")]
    return rows + [Row("profile", profile=True)]


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


def text_tower(flavor: str, device: torch.device):
    """The frozen text encoder of tokens mode: ViT-bigG's shape for v2 (seeded random weights; the
    speed is the shape's), a tiny tower of the flavor's width otherwise."""
    from stages import StageC
    from stages.text_encoders import ClipTextEncoder

    width = StageC.flavor_config(flavor).c_cond
    shape = BIGG if flavor == "v2" else {"width": width, "layers": 2, "heads": 2}
    return ClipTextEncoder.tiny(**shape).to(device).eval()


class Bench:
    """Builds a row's model and step on `device`, times it, counts its FLOPs."""

    def __init__(self, flavor: str, device: torch.device, steps: int, warmup: int, peak_tflops: float,
                 latent_side: int = 24):
        self.flavor, self.device, self.steps, self.warmup, self.peak = flavor, device, steps, warmup, peak_tflops
        self.latent_side = latent_side  # z_C's height and width: 24 for 1024 px images
        self.cuda = device.type == "cuda"
        self._flops = {}
        self._tower = None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def tower(self):
        if self._tower is None:
            self._tower = text_tower(self.flavor, self.device)
        return self._tower

    def build(self, row: Row):
        """(step function, model) for `row`: the trainer's own parts, on synthetic data."""
        from pipelines.training.config import EmaConfig
        from pipelines.training.ema import Ema
        from pipelines.training.parallel import grad_norm_and_clip, parallelize
        from pipelines.training.regions import prepare_blocks
        from pipelines.training.tasks import text_condition
        from stages import StageC
        from stages.objectives import StageCObjective, stage_c_loss

        torch.manual_seed(0)
        with torch.device(self.device):  # initialised where it runs: a v2 prior takes seconds to initialise on a CPU
            model = StageC.from_flavor(self.flavor)
        model = prepare_blocks(model, row.checkpointing, row.compile, channels_last=not row.fsdp2)
        ema = Ema(model, EmaConfig(mode="every_step", decay=0.999))
        model = parallelize(model, "fsdp2", self.device, bf16=self.cuda) if row.fsdp2 else model.to(self.device)
        ema.place_like(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True if self.cuda else None)
        objective = StageCObjective(caption_dropout=0.0)
        generator = torch.Generator(device=self.device).manual_seed(0)
        b, c_cond = row.batch, model.config.c_cond
        z_c = torch.randn(b, 16, self.latent_side, self.latent_side, device=self.device) * 0.024 + 0.024
        if row.tokens:
            tower = self.tower()
            batch = {"text_tokens": torch.randint(0, 49408, (b, TEXT_TOKENS), device=self.device),
                     "text_mask": torch.ones(b, TEXT_TOKENS, dtype=torch.long, device=self.device)}
        else:
            tower, batch = None, {"text_embeddings": torch.randn(b, TEXT_TOKENS, c_cond, device=self.device)}

        def step():
            optimizer.zero_grad(set_to_none=True)
            with _attention_backend(row.attention), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
                loss = stage_c_loss(model, z_c, text_condition(batch, tower), None, objective, generator)
            loss.backward()
            grad_norm_and_clip(model, 1.0)
            optimizer.step()
            ema.update(model, 1)
            return loss

        return step, model

    def flops(self, row: Row, checkpointing: str, counted_batch: int = 4) -> float:
        """FLOPs of one training step of `row` with `checkpointing`, counted on the eager, unsharded
        model at `counted_batch` and scaled to the row's batch (every counted op is per sample)."""
        key = (row.tokens, checkpointing)
        if key not in self._flops:
            from torch.utils.flop_counter import FlopCounterMode

            counted = Row("count", batch=counted_batch, checkpointing=checkpointing, tokens=row.tokens)
            step, model = self.build(counted)
            counter = FlopCounterMode(display=False)
            with counter:
                step()
            self._flops[key] = float(counter.get_total_flops()) / counted_batch
            del step, model
            self.release()
        return self._flops[key] * row.batch

    def release(self):
        if self.cuda:
            torch.cuda.empty_cache()

    def run(self, row: Row) -> dict:
        step, model = self.build(row)
        for _ in range(self.warmup):
            step()
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        profiler = _profiler(self.cuda) if row.profile else contextlib.nullcontext()
        with profiler as prof:
            for _ in range(self.steps):
                step()
            self.sync()
        seconds = (time.perf_counter() - start) / self.steps
        out = {"row": row.name, "batch": row.batch, "checkpointing": row.checkpointing, "compile": row.compile,
               "fsdp2_bf16": row.fsdp2, "attention": row.attention or "auto", "text": "tokens" if row.tokens else "embeddings",
               "step_s": seconds, "samples_per_s": row.batch / seconds,
               "peak_memory_gib": torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None}
        del step, model
        self.release()
        model_flops, hardware_flops = self.flops(row, "none"), self.flops(row, row.checkpointing)
        out |= {"model_tflops_per_step": model_flops / 1e12, "hardware_tflops_per_step": hardware_flops / 1e12,
                "mfu": model_flops / seconds / 1e12 / self.peak, "hfu": hardware_flops / seconds / 1e12 / self.peak}
        if row.profile:
            out["kernels"] = kernel_summary(prof, self.steps)
        return out


def _attention_backend(name: str | None):
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel(backends[name])


def _profiler(cuda: bool):
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))


# Kernel name fragments -> category, first match wins.
KERNEL_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "cudnn_generated_fort_native_sdpa", "sdpa")),
    ("matmul", ("gemm", "cutlass", "xmma", "sm90", "sm80", "cublas", "matmul", "addmm", "mm")),
    ("convolution", ("conv", "depthwise", "wgrad", "dgrad")),
    ("norm", ("layer_norm", "layernorm", "norm")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "lerp")),
    ("communication", ("nccl", "allgather", "reduce_scatter", "allreduce")),
    ("copy", ("copy", "memcpy", "memset", "cat", "transpose")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "triton", "pointwise", "reduce", "gelu", "silu")),
)


def kernel_category(name: str) -> str:
    lowered = name.lower()
    return next((category for category, parts in KERNEL_CATEGORIES if any(p in lowered for p in parts)), "other")


def kernel_summary(prof, steps: int, top: int = 12) -> dict:
    """The top kernels by device time per step (ms) and the share of device time by category; on a
    CPU run, the top operators by their own CPU time instead."""
    from torch.autograd import DeviceType

    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    on_device = bool(events)
    if on_device:
        timing = lambda e: e.self_device_time_total  # noqa: E731
    else:
        events, timing = [e for e in prof.key_averages() if e.self_cpu_time_total > 0], lambda e: e.self_cpu_time_total  # noqa: E731
    total = sum(timing(e) for e in events) or 1.0
    by_category = {}
    for e in events:
        category = kernel_category(e.key)
        by_category[category] = by_category.get(category, 0.0) + timing(e) / total
    ranked = sorted(events, key=timing, reverse=True)[:top]
    return {"clock": "device" if on_device else "cpu",
            "share_by_category": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
            "top_ms_per_step": [{"name": e.key[:120], "category": kernel_category(e.key), "ms": timing(e) / 1e3 / steps}
                                for e in ranked]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="v2")
    parser.add_argument("--rows", default="all", help="comma-separated row names, or all: " + ",".join(r.name for r in matrix()))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--deadline-s", type=float, default=300.0, help="no row starts that would likely end after this")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200 SXM)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of a small flavor")
    parser.add_argument("--jsonl", help="append each row's JSON line to this file too")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    device = single_rank_group(args.device, port=29512)
    rows = matrix() if args.rows == "all" else [r for r in matrix() if r.name in args.rows.split(",")]
    bench = Bench(args.flavor, device, args.steps, args.warmup, args.peak_tflops)
    header = {"gpu": torch.cuda.get_device_name(device) if bench.cuda else "cpu", "torch": torch.__version__,
              "flavor": args.flavor, "steps": args.steps, "peak_tflops": args.peak_tflops}
    _emit({"header": header}, args.jsonl)
    longest = 0.0
    for row in rows:
        left = args.deadline_s - (time.perf_counter() - started)
        needed = longest * (2.0 if row.compile else 1.2)
        if left < needed:
            _emit({"stopped_before": row.name, "seconds_left": left, "longest_row_s": longest}, args.jsonl)
            break
        row_start = time.perf_counter()
        try:
            out = bench.run(row)
        except Exception as err:  # a backend the GPU lacks, an out-of-memory batch: said, and on to the next row
            out = {"row": row.name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            bench.release()
        out["row_s"] = time.perf_counter() - row_start
        longest = max(longest, out["row_s"])
        _emit(out, args.jsonl)
    dist.destroy_process_group()
    return 0


def _emit(line: dict, jsonl: str | None) -> None:
    text = json.dumps(line)
    print(text, flush=True)
    if jsonl:
        with open(jsonl, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
