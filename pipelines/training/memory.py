"""The memory plan of a training run: what one GPU holds at the step's peak (parameters, gradients,
optimizer state, EMA, activations and temporaries), known before the run starts.

It is measured, not modelled: two training steps of the configured model run on fake tensors (no
memory allocated, `torch._subclasses.FakeTensorMode`) under PyTorch's own memory trackers
(`torch.distributed._tools`: `MemTracker`, or `FSDPMemTracker` for FSDP2 sharded over a fake process
group of the run's world size), with the run's batch, precision (bf16 autocast) and activation
checkpointing; the peak is that of the second step, when the optimizer's state exists. Added from
their sizes: the EMA (not an optimizer state), DDP's gradient buckets and the frozen text encoder of
tokens mode. Left out: the CUDA context and the allocator's fragmentation (`HEADROOM` of the GPU is
kept for them), and what a GPU's kernels save over the CPU's (fused attention keeps no score
matrix: the estimate errs high there).
"""

import dataclasses

import torch

from pipelines.training.config import TrainConfig

# The share of a GPU's memory a plan may fill: the rest is the CUDA context, NCCL's buffers and the
# caching allocator's fragmentation.
HEADROOM = 0.9
PARTS = ("parameters", "gradients", "optimizer", "ema", "activations", "temporaries", "text_encoder")
GIB = 2**30


@dataclasses.dataclass
class MemoryPlan:
    """Bytes per GPU at the peak of a training step, by part, for the run it describes."""

    run: dict  # what the plan is of: stage, flavor, strategy, GPUs, batch, precision, checkpointing, shapes
    parts: dict[str, int]
    gpu_bytes: int | None = None  # the GPU's memory, when known

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_bytes is None else self.total <= HEADROOM * self.gpu_bytes

    def describe(self) -> str:
        r = self.run
        tuned = f" with a rank-{r['lora_rank']} LoRA" if r.get("lora_rank") else ""
        lines = [f"memory plan: Stage {r['stage'].upper()} {r['flavor']}{tuned}, {r['strategy']} on {r['gpus']} GPU(s), "
                 f"batch {r['batch']} per GPU, {r['precision']}, activation checkpointing {r['checkpointing']}"]
        lines += [f"  {name:<13}{self.parts[name] / GIB:9.2f} GiB" for name in PARTS if self.parts.get(name)]
        lines.append(f"  {'total':<13}{self.total / GIB:9.2f} GiB per GPU at the step's peak")
        if self.gpu_bytes is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {verdict} a {self.gpu_bytes / GIB:.0f} GiB GPU (at most {HEADROOM:.0%} of it: "
                         f"{HEADROOM * self.gpu_bytes / GIB:.1f} GiB)")
        return "\n".join(lines)


def _loss(cfg: TrainConfig, model, shapes: dict[str, list[int]], batch: int, generator):
    """The configured stage's training loss on a batch of (fake) tensors of the cache's shapes."""
    from stages.objectives import stage_a_loss, stage_b_loss, stage_c_loss

    def tensor(name: str, channels_last_image: bool = False):
        shape = shapes[name]
        if channels_last_image:  # cached HWC images become (B, 3, H, W) floats
            return torch.rand(batch, shape[2], shape[0], shape[1])
        return torch.randn(batch, *shape)

    stage = cfg.model.stage
    if stage == "c":
        width = model.config.c_cond
        text = torch.randn(batch, 77, width)
        return stage_c_loss(model, tensor("stage_c_latents"), text, torch.zeros(1, 77, width), cfg.objective, generator)
    if stage == "b":
        compress = cfg.model.train_semantic_compressor
        condition = tensor("semantic_images", True) if compress else tensor("stage_c_latents")
        return stage_b_loss(model, tensor("stage_a_latents"), condition, tensor("decoder_text_embeddings"),
                            cfg.decoder_objective, generator, compress=compress)
    return stage_a_loss(model, tensor("images", True), cfg.vqgan_objective, generator)


class _NoHook:
    """Stands for a hook handle never registered (see estimate)."""

    def remove(self) -> None:
        pass


_NO_HOOK = _NoHook()


def _fake_parameters(model, fake) -> None:
    """Every real parameter of `model` replaced by a fake one of its shape (no memory)."""
    from torch import nn
    from torch._subclasses.fake_tensor import FakeTensor

    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if not isinstance(p, FakeTensor):
                setattr(module, name, nn.Parameter(fake.from_tensor(p.detach()), requires_grad=p.requires_grad))


def _trainable_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def estimate(cfg: TrainConfig, shapes: dict[str, list[int]], gpus: int | None = None, gpu_bytes: int | None = None,
             text_encoder_bytes: int = 0) -> MemoryPlan:
    """The plan of `cfg`'s run on `gpus` GPUs (default parallel.num_workers), for a cache of these
    tensor `shapes` (the manifest's). Needs no GPU and allocates no model: a v2 prior's plan takes about
    a minute of CPU. Must not run inside a process group (it makes a fake one for FSDP2)."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from pipelines.training.parallel import parallelize
    from pipelines.training.regions import checkpoint_activations
    from stages.lora import add_lora

    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("a memory plan is made outside any process group (it makes a fake one of the run's size)")
    p, batch = cfg.parallel, cfg.data.batch_size
    gpus = gpus or p.num_workers
    bf16 = p.bf16("cuda" if p.use_gpu else "cpu")
    fsdp = p.strategy == "fsdp2"
    run = {"stage": cfg.model.stage, "flavor": cfg.model.flavor, "strategy": p.strategy, "gpus": gpus, "batch": batch,
           "precision": "bf16" if bf16 else "fp32", "checkpointing": cfg.model.activation_checkpointing, "shapes": shapes,
           "lora_rank": cfg.model.lora.rank if cfg.model.lora is not None else None}
    fake = FakeTensorMode()
    if fsdp:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=gpus)
    try:
        with fake:
            torch.manual_seed(cfg.seed)
            model = dataclasses.replace(cfg.model, lora=None).build()
        if cfg.model.lora is not None:  # peft moves the adapter it makes, which fake tensors do not allow: made real, then faked
            add_lora(model, cfg.model.lora.spec())
            _fake_parameters(model, fake)
        checkpoint_activations(model, cfg.model.activation_checkpointing)
        trainable = _trainable_bytes(model)
        if fsdp:  # outside the fake mode: the device mesh is made of real values
            model = parallelize(model, "fsdp2", torch.device("cpu"), bf16=bf16, reshard_after_forward=p.reshard_after_forward)
        with fake:
            o = cfg.optim
            optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=o.lr,
                                          betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
            tracker = FSDPMemTracker(model, optimizer) if fsdp else MemTracker()
            if not fsdp:
                tracker.track_external(model, optimizer)
            # torch's trackers hook every parameter's gradient, which a frozen one (a LoRA's base) refuses:
            # marked as hooked already, they are counted as parameters only.
            for q in model.parameters():
                if not q.requires_grad:
                    tracker._param_to_grad_hook_handles[q] = (_NO_HOOK, _NO_HOOK)
            generator = torch.Generator()
            with tracker:
                for step in range(2):  # the second step's peak holds the optimizer's state
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        loss = _loss(cfg, model, shapes, batch, generator)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if step == 0:
                        tracker.reset_mod_stats()
            peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    finally:
        if fsdp:
            dist.destroy_process_group()
    by_name = {str(getattr(k, "name", k)).lower(): v for k, v in peak.items() if k != "Total"}
    share = gpus if fsdp else 1
    parts = {
        "parameters": by_name.get("param", 0) + by_name.get("sharded_param", 0) + by_name.get("unsharded_param", 0),
        "gradients": by_name.get("grad", 0) + by_name.get("sharded_grad", 0) + by_name.get("unsharded_grad", 0)
                     + by_name.get("reduce_scatter", 0) + (trainable if p.strategy == "ddp" and gpus > 1 else 0),  # DDP's buckets
        "optimizer": by_name.get("opt", 0),
        "ema": trainable // share if cfg.ema.mode != "none" else 0,
        "activations": by_name.get("act", 0),
        "temporaries": sum(by_name.get(k, 0) for k in ("temp", "all_gather", "inp", "oth", "buffer")),
        "text_encoder": text_encoder_bytes,
    }
    return MemoryPlan(run, {k: int(v) for k, v in parts.items()}, gpu_bytes)
