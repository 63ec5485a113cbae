"""What the trainer applies to a built model from outside it, block by block, as the parallelism is:
activation checkpointing (none, selective or full), regional `torch.compile`, and the memory layout of
its convolutions. The blocks keep their classes and parameter names (state-dict keys unchanged), and
FSDP2's hooks, registered later on the same modules, wrap the changed calls.

- Activation checkpointing recomputes a block's activations in backward instead of keeping them.
  "full" keeps only the block's inputs; "selective" also keeps the outputs of its matrix products and
  attention (the costly ops), recomputing only the cheap elementwise ones (norms, GELU, GRN,
  modulation): most of full checkpointing's memory saving at a fraction of its recompute.
- Regional compile: each repeated block compiled on its own (`nn.Module.compile`, in place). The
  blocks of one class share their compiled code, so a 32-deep prior compiles three blocks, not a
  whole model, and a change of batch size recompiles little.
- Channels-last convolutions: the trunk of Stage C and Stage B turns channels-last after its first
  ResBlock (the Linear layers work on channels-last views), so a convolution's weight gradient comes
  out channels-last. With contiguous weights, DDP finds gradients laid out unlike its buckets and
  warns ("Grad strides do not match bucket view strides") on every run; laid out as their gradients
  come, no gradient needs a layout copy.
"""

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

ACTIVATION_CHECKPOINTING = ("none", "selective", "full")

_aten = torch.ops.aten
# What "selective" keeps: the outputs of matrix products and attention.
_SAVED_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default, _aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks a model repeats, in module order: Stage C's and Stage B's residual, timestep and
    attention blocks, Stage A's mixing blocks. Everything else (mappers, embeddings, samplers, heads)
    runs once per forward."""
    from stages.blocks import AttnBlock, ResBlock, ResBlockStageB, TimestepBlock
    from stages.stage_a import MixingResidualBlock

    kinds = (ResBlock, ResBlockStageB, TimestepBlock, AttnBlock, MixingResidualBlock)
    return [m for m in model.modules() if isinstance(m, kinds)]


def _keep_products(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_products)


def _checkpointed(forward, context_fn, *args):
    if not torch.is_grad_enabled():  # validation and sampling keep nothing for backward anyway
        return forward(*args)
    kwargs = {"context_fn": context_fn} if context_fn is not None else {}
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_activations(model: nn.Module, mode: str) -> nn.Module:
    """Activation checkpointing of every repeated block (`mode` in ACTIVATION_CHECKPOINTING); in place."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"activation checkpointing must be one of {ACTIVATION_CHECKPOINTING}, got {mode!r}")
    if mode == "none":
        return model
    context_fn = _selective_contexts if mode == "selective" else None
    for block in repeated_blocks(model):
        block.forward = functools.partial(_checkpointed, block.forward, context_fn)
    return model


def compile_blocks(model: nn.Module) -> nn.Module:
    """Regional compile: every repeated block compiled in place (its checkpointing inside the compiled
    region, where compile plans the recompute). Apply after `checkpoint_activations`, before the
    parallelism."""
    for block in repeated_blocks(model):
        block.compile()
    return model


def prepare_blocks(model: nn.Module, activation_checkpointing: str = "none", compile: bool = False,
                   channels_last: bool = True) -> nn.Module:
    """All of the above, in order, as the trainer applies them to a model before its parallelism.
    `channels_last`: False under FSDP2, which shards contiguous parameters only (a channels-last
    2x2 or 3x3 convolution weight is not contiguous) and copies gradients into its own buffers, so
    the stride mismatch that DDP warns about does not arise there."""
    checkpoint_activations(model, activation_checkpointing)
    if channels_last:
        channels_last_convolutions(model)
    return compile_blocks(model) if compile else model


def channels_last_convolutions(model: nn.Module) -> nn.Module:
    """Every convolution's weight laid out channels-last (in place), as its gradient comes out: for
    DDP, whose gradient buckets take the parameters' strides."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            module.to(memory_format=torch.channels_last)
    return model
