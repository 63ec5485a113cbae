"""The train state: everything a resume needs to go on exactly where a run stopped (the parallelized
model, the optimizer and its lr schedule, the EMA, the data position, the step), with
`state_dict` / `load_state_dict` for the checkpointer. The random draws of a step (t, noise,
caption dropout, dropout masks) are seeded from (seed, rank, step), so the step is their state too.
"""

import numpy as np
import torch
from torch import nn

from pipelines.training.config import TrainConfig
from pipelines.training.data import EqualStepBatches
from pipelines.training.ema import Ema
from pipelines.training.regions import prepare_blocks
from pipelines.training.parallel import (
    full_model_state,
    load_full_model_state,
    load_optimizer_state,
    optimizer_state,
    parallelize,
    unwrap,
)


def warmup(steps: int):
    """The lr factor of a linear warmup over `steps`, then constant."""
    return lambda step: min(1.0, (step + 1) / steps) if steps > 0 else 1.0


class TrainState:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ema: Ema, batches: EqualStepBatches,
                 cfg: TrainConfig, device: torch.device):
        self.model, self.optimizer, self.ema, self.batches, self.cfg = model, optimizer, ema, batches, cfg
        self.device = device
        self.bf16 = cfg.parallel.bf16(device.type)  # the step under bf16 autocast
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup(cfg.optim.warmup_steps))
        self.step = 0
        self.generator = torch.Generator(device=device)  # t, noise and caption dropout of the step, drawn on the device

    @classmethod
    def build(cls, model: nn.Module, batches: EqualStepBatches, cfg: TrainConfig, device: torch.device) -> "TrainState":
        """The bare `model` with its EMA, prepared block by block (regions.py: activation checkpointing,
        channels-last convolutions, compile), parallelized (the EMA laid out as its parameters), and its
        AdamW (fused on CUDA: one kernel for all parameters)."""
        p = cfg.parallel
        prepare_blocks(model, cfg.model.activation_checkpointing, cfg.model.compile, channels_last=p.strategy != "fsdp2")
        ema = Ema(model, cfg.ema)
        model = parallelize(model, p.strategy, device, bf16=p.bf16(device.type), reshard_after_forward=p.reshard_after_forward)
        ema.place_like(model)
        model.train()
        o = cfg.optim
        trained = [q for q in unwrap(model).parameters() if q.requires_grad]  # a LoRA's adapter, or all
        optimizer = torch.optim.AdamW(trained, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                      weight_decay=o.weight_decay, fused=True if device.type == "cuda" else None)
        return cls(model, optimizer, ema, batches, cfg, device)

    def autocast(self):
        """The step's precision, also for validation: with FSDP2's bf16 policy the blocks hand bf16 to
        the fp32 root, which autocast reconciles."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def seed_step(self, rank: int) -> None:
        """Seeds the draws of the coming step from (seed, rank, step), not once per start: a step rerun
        after a restart draws the same t, noise, caption dropout (generator) and dropout masks
        (torch's global RNG) as the first time, so the rerun computes what the failed attempt logged
        (see MetricLogger.skip_logged)."""
        noise_seed, dropout_seed = np.random.SeedSequence([self.cfg.seed % 2**64, rank, self.step]).generate_state(2)
        self.generator.manual_seed(int(noise_seed))
        torch.manual_seed(int(dropout_seed))

    def state_dict(self, sharded: bool = False) -> dict:
        """Full (gathered, CPU) states of model, EMA (None without one) and optimizer, the step and the
        data position. Every rank must call it (FSDP2 gathers). `sharded`: model and optimizer are left
        out (None): they go to torch.distributed.checkpoint instead (see checkpoint.save_sharded)."""
        return {
            "model": None if sharded else full_model_state(self.model),
            "ema": self.ema.full_state(self.model) if self.ema.shadow else None,
            "optimizer": None if sharded else optimizer_state(self.model, self.optimizer, self.cfg.parallel.strategy),
            "step": self.step,
            "data_position": self.batches.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Takes a `state_dict` back; model, ema and optimizer may be missing or None (a sharded
        checkpoint loads them with checkpoint.load_sharded). Every rank must call it."""
        if state.get("model") is not None:
            load_full_model_state(self.model, state["model"])
        if state.get("ema") is not None and self.ema.shadow:
            self.ema.restore(state["ema"])
            self.ema.place_like(self.model)
        if state.get("optimizer") is not None:
            load_optimizer_state(self.model, self.optimizer, state["optimizer"], self.cfg.parallel.strategy)
        self.step = state["step"]
        self.batches.load_state_dict(state["data_position"])
        # The schedule as it stands after `step` steps (the optimizer's param groups hold initial_lr).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup(self.cfg.optim.warmup_steps),
                                                           last_epoch=self.step - 1)
