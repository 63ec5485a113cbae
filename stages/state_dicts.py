"""Strict state-dict loading with errors that say which file and which keys do not match."""

from collections.abc import Mapping

import torch
from torch import nn

# How many key names an error lists before it only counts the rest.
_LISTED_KEYS = 8


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not match the model it is loaded into."""


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED_KEYS])
    more = len(keys) - _LISTED_KEYS
    return shown + (f" (and {more} more)" if more > 0 else "")


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raises CheckpointMismatchError naming `source` when keys or shapes differ from `model`'s."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        f"{k} {tuple(state_dict[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    if not (missing or unexpected or wrong_shape):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listed(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} tensors of the wrong shape (checkpoint != model): {_listed(wrong_shape)}")
    config = getattr(model, "config", None)
    raise CheckpointMismatchError(
        f"{source} does not match {type(model).__name__}({config}): "
        + "; ".join(problems)
        + ". Check that the checkpoint is of this model and that the flavor/config matches it."
    )


def load_state_dict_strict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Checks, then loads `state_dict` into `model` by assignment (works for a meta-device model).

    Floating-point tensors are cast to `dtype` when given; integer buffers (BatchNorm's
    num_batches_tracked) keep theirs.
    """
    check_state_dict(model, state_dict, source)
    converted = {}
    for key, tensor in state_dict.items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if device is not None:
            tensor = tensor.to(device)
        converted[key] = tensor
    model.load_state_dict(converted, strict=True, assign=True)
    return model
