"""Data parallelism applied from outside the model by one function: DDP, or FSDP2 (`fully_shard`
per block, then the root). Works on CPU (gloo) and CUDA (NCCL). Also the full-state-dict gathers
that checkpoints need, which for FSDP2 are collectives every rank must join."""

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def parallelize(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """The model wrapped for `strategy`; the bare model's parameter names are kept (FSDP2) or sit
    under `.module` (DDP: use `unwrap`)."""
    model = model.to(device)
    if not is_distributed():
        return model
    if strategy == "ddp":
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in sharding_units(model):
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"unknown parallel strategy {strategy!r}")


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """FSDP2's units: each residual, timestep and attention block (Stage C's `blocks`, the blocks of
    each level of Stage B, Stage A's mixing blocks), then the model itself holds what is left
    (mappers, embedding, head; Stage A's convolutions, BatchNorm and codebook)."""
    from stages.blocks import AttnBlock, ResBlock, ResBlockStageB, TimestepBlock
    from stages.stage_a import MixingResidualBlock

    units = (ResBlock, ResBlockStageB, TimestepBlock, AttnBlock, MixingResidualBlock)
    return [m for m in model.modules() if isinstance(m, units)]


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def reshard(model: nn.Module) -> None:
    """FSDP2 leaves the root's parameters gathered after a forward that no backward follows (a
    validation pass): shards them again, the layout the optimizer and the EMA hold."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to its full value (a collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded state dict on the CPU; every rank must call it (FSDP2 gathers)."""
    return {k: full_tensor(v).detach().cpu() for k, v in unwrap(model).state_dict().items()}


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads a full state dict (every rank holds all of it) into the parallelized model, each tensor
    laid out as the model's own (FSDP2: this rank's shard); every rank must call it."""
    own = unwrap(model).state_dict()
    unwrap(model).load_state_dict({k: shard_like(v, own[k]) if k in own else v for k, v in state.items()})


def shard_like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `reference`: the same DTensor sharding, or a plain tensor on its device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(reference, DTensor):
        return distribute_tensor(full.to(reference.device, reference.dtype), reference.device_mesh, reference.placements)
    return full.to(reference.device, reference.dtype)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str) -> dict:
    """The optimizer's full state (FSDP2: gathered, keyed by parameter names); every rank calls it."""
    if strategy == "fsdp2" and is_distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, strategy: str) -> None:
    if strategy == "fsdp2" and is_distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def grad_norm_and_clip(model: nn.Module, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), max_norm)
    return float(full_tensor(norm))
