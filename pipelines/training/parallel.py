"""Data parallelism applied from outside the model by one function: DDP, or FSDP2 (`fully_shard`
per block, then the root). Works on CPU (gloo) and CUDA (NCCL). Also the full-state-dict gathers
that checkpoints need, which for FSDP2 are collectives every rank must join."""

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


# FSDP2 frees a block's gathered parameters after its forward (and gathers them again for its
# backward) when the whole model's gathered parameters would take more than this: below it, keeping
# them saves an all-gather per block for little memory (v2's prior, 1.0B parameters: 2 GB in bf16).
RESHARD_ABOVE_BYTES = 4 * 2**30


def parallelize(model: nn.Module, strategy: str, device: torch.device, bf16: bool = False,
                reshard_after_forward: bool | None = None) -> nn.Module:
    """The model wrapped for `strategy`; the bare model's parameter names are kept (FSDP2) or sit
    under `.module` (DDP: use `unwrap`). FSDP2: each of `sharding_units` is one unit, the model the
    root; `bf16`: the units gather their parameters in bf16 and reduce gradients in fp32 (the root,
    with the input and output maths, stays fp32); `reshard_after_forward`: None chooses by size
    (RESHARD_ABOVE_BYTES)."""
    if any(p.device != device for p in model.parameters()):
        model = model.to(device)
    if not is_distributed():
        return model
    if strategy == "ddp":
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        if reshard_after_forward is None:
            gathered = sum(p.numel() for p in model.parameters()) * (2 if bf16 else 4)
            reshard_after_forward = gathered > RESHARD_ABOVE_BYTES
        for unit in sharding_units(model):
            fully_shard(unit, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        fully_shard(model, reshard_after_forward=False)  # the root's parameters are the first backward needs
        return model
    raise ValueError(f"unknown parallel strategy {strategy!r}")


def sharding_units(model: nn.Module) -> list[list[nn.Module]]:
    """FSDP2's units: each residual block with the timestep and attention blocks that follow it (Stage
    C's triplets; Stage B's blocks of a level, block by block), each Stage A mixing block. The model
    itself holds what is left (mappers, embedding, samplers, head; Stage A's convolutions, BatchNorm
    and codebook)."""
    from pipelines.training.regions import repeated_blocks
    from stages.blocks import AttnBlock, TimestepBlock

    blocks = {id(b) for b in repeated_blocks(model)}
    units = []
    for parent in model.modules():
        current = None
        for child in parent.children():
            if id(child) not in blocks:
                current = None
            elif current is not None and isinstance(child, (TimestepBlock, AttnBlock)):
                current.append(child)  # modulates or attends on what the unit's residual block made
            else:
                current = [child]
                units.append(current)
    return units


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def spread_over_ranks(count: int, work) -> torch.Tensor:
    """work(indices) -> a tensor (len(indices), ...) for those of the items 0..count-1, computed with
    the items spread over the ranks and gathered: the tensor of all `count` items, in order, on every
    rank (every rank must call it, with the same count). Rank r works on items r, r + world, ...;
    each rank on the same number of them (a short share repeats its last item, whose result is
    dropped), so every rank runs the same forwards, which FSDP2's collectives need. Without a process
    group, work(all of them)."""
    if not is_distributed() or dist.get_world_size() == 1 or count == 0:
        return work(list(range(count)))
    rank, world = dist.get_rank(), dist.get_world_size()
    each = -(-count // world)
    mine = list(range(rank, count, world)) or [0]
    done = work(mine + mine[-1:] * (each - len(mine))).contiguous()
    gathered = [torch.empty_like(done) for _ in range(world)]
    dist.all_gather(gathered, done)
    items = torch.arange(count)
    return torch.stack(gathered)[items % world, items // world]


def mean_over_ranks(rows: list[tuple], loss) -> float:
    """loss(batches) -- a mean over the rows of `batches` (tuples of (keys, tensors...) per batch, like
    `rows`) -- of all `rows`, computed with the rows spread over the ranks: each rank takes one
    contiguous world-th of them, in batches of the rows' batch size, and the means are combined by
    their row counts. Every rank must call it with the same rows; each runs the same number of
    batches (a short share runs its first batch again and drops it), which FSDP2 needs. Without a
    process group, loss(all rows)."""
    count = sum(len(batch[0]) for batch in rows)
    if not is_distributed() or dist.get_world_size() == 1 or count == 0:
        return loss(iter(rows))
    rank, world = dist.get_rank(), dist.get_world_size()
    size, each = max(len(batch[0]) for batch in rows), -(-count // world)
    keys = [k for batch in rows for k in batch[0]]
    columns = [torch.cat([batch[i] for batch in rows]) for i in range(1, len(rows[0]))]
    start, stop = min(rank * each, count), min((rank + 1) * each, count)
    mine = [(keys[i:min(i + size, stop)], *(c[i:min(i + size, stop)] for c in columns)) for i in range(start, stop, size)]
    value = loss(iter(mine)) if mine else 0.0
    padding = -(-each // size) - len(mine)
    if padding:
        loss(iter(rows[:1] * padding))  # dropped: only so that this rank runs the forwards the others do
    total = torch.tensor([value * (stop - start), stop - start], dtype=torch.float64, device=columns[0].device)
    dist.all_reduce(total)
    return float(total[0] / total[1])


def reshard(model: nn.Module) -> None:
    """FSDP2 leaves parameters gathered after a forward that no backward follows (a validation pass):
    the root's, and every unit's that does not reshard after forward. Shards them all again, the
    layout the optimizer, the EMA and the checkpoints hold."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to its full value (a collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def saved_keys(model: nn.Module):
    """Which state-dict entries a checkpoint of `model` holds: a LoRA-adapted model's adapter (its base
    is model.init's, frozen), else all of them. A predicate on the key."""
    from stages.lora import is_adapted, is_adapter_key

    return is_adapter_key if is_adapted(unwrap(model)) else (lambda key: True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded state dict on the CPU, contiguous (a channels-last weight too: safetensors
    writes contiguous tensors only), of what a checkpoint holds (`saved_keys`); every rank must call
    it (FSDP2 gathers)."""
    keep = saved_keys(model)
    return {k: full_tensor(v).detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items() if keep(k)}


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads a full state dict (every rank holds all of it) into the parallelized model, each tensor
    laid out as the model's own (FSDP2: this rank's shard); every rank must call it. For an adapted
    model the state is its adapter's, all of it."""
    keep = saved_keys(model)
    own = unwrap(model).state_dict()
    expected = {k for k in own if keep(k)}
    if set(state) != expected and len(expected) != len(own):
        raise ValueError(f"the checkpoint's adapter does not fit the model's: missing {sorted(expected - set(state))[:4]}, "
                         f"unexpected {sorted(set(state) - expected)[:4]}")
    unwrap(model).load_state_dict({k: shard_like(v, own[k]) if k in own else v for k, v in state.items()},
                                  strict=len(expected) == len(own))


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


def grad_norm_and_clip(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clips the gradients to `max_norm`; their total norm before clipping, a tensor on the device
    (read it when logging: reading it is a host sync). Every rank must call it (FSDP2)."""
    norm = torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), max_norm)
    return full_tensor(norm)
