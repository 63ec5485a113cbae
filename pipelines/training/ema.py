"""An exponential moving average of the weights, kept in the same layout as the parameters (plain
tensors for DDP, sharded DTensors for FSDP2), with the original Würstchen schedule as an option."""

import contextlib

import torch
from torch import nn

from pipelines.training.config import EmaConfig
from pipelines.training.parallel import full_tensor, reshard, saved_keys, shard_like, unwrap


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the same storage), or the tensor: what a foreach op takes."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class Ema:
    def __init__(self, model: nn.Module, cfg: EmaConfig):
        self.cfg = cfg
        # Of the trained parameters only (a LoRA's adapter: its frozen base is its own average).
        self.shadow = ({name: p.detach().clone() for name, p in unwrap(model).named_parameters() if p.requires_grad}
                       if cfg.mode != "none" else {})

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, last: bool = False) -> None:
        """Called after optimizer step `step` (1-based); `last`: the run's final step, which the
        original schedule takes too when it falls between two of its updates."""
        cfg = self.cfg
        if cfg.mode == "none":
            return
        if cfg.mode == "every_step":
            weight = 1.0 - cfg.decay
        elif step % cfg.every != 0 and not last:
            return
        else:  # original: copy during the first `copy_until` steps, then a sparse average
            weight = 1.0 if step <= cfg.copy_until else 1.0 - cfg.beta
        names_and_params = [(name, p) for name, p in unwrap(model).named_parameters() if name in self.shadow]
        shadows = [_local(self.shadow[name]) for name, _ in names_and_params]
        torch._foreach_lerp_(shadows, [_local(p.detach()) for _, p in names_and_params], weight)  # a few kernels, not one per tensor

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        """The model holds the EMA weights inside the block (to validate what gets registered) and
        its own weights again after it. Swapped in place, one parameter at a time: no second copy of
        the model is held, whatever its size. Every rank must enter it (FSDP2)."""
        self._swap(model)
        try:
            yield model
        finally:
            self._swap(model)

    @torch.no_grad()
    def _swap(self, model: nn.Module) -> None:
        reshard(model)  # FSDP2: the parameters in their sharded layout, which the shadow has
        for name, p in unwrap(model).named_parameters():
            if name not in self.shadow:
                continue
            held = p.detach().clone()
            p.copy_(self.shadow[name])
            self.shadow[name].copy_(held)

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The EMA weights as a full state dict of what a checkpoint holds (parallel.saved_keys: the
        buffers and any frozen weights from the model; a LoRA's adapter only); every rank must call it."""
        keep = saved_keys(model)
        state = {k: full_tensor(v).detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items() if keep(k)}
        for name, value in self.shadow.items():
            state[name] = full_tensor(value).detach().cpu().contiguous()
        return state

    def restore(self, full_state: dict[str, torch.Tensor]) -> None:
        """Takes the EMA weights of a checkpoint (full tensors), before `place_like`."""
        for name in self.shadow:
            self.shadow[name] = full_state[name].detach().clone()

    def place_like(self, model: nn.Module) -> None:
        """Lays the EMA out as the (now parallelized) parameters: same device, same sharding."""
        for name, p in unwrap(model).named_parameters():
            if name in self.shadow:
                self.shadow[name] = shard_like(self.shadow[name], p.detach())
