"""The original (dome272/Wuerstchen) checkpoint layout: pickled `.pt` files holding
`state_dict` / `ema_state_dict` (and, for Stage B, `effnet_state_dict`).

Differences to the diffusers layout: attention is `nn.MultiheadAttention` (a packed
`attn.in_proj_weight` [3c, c] in q | k | v order and `attn.out_proj`), and Stage A's codebook is
`vquantizer.codebook`. Files are read with `weights_only=True`: no code in them runs.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from stages.pretrained import PretrainedModel
from stages.semantic_compressor import SemanticCompressor
from stages.state_dicts import load_state_dict_strict

# Prefixes that wrappers add to every key: DDP (`module.`) and torch.compile (`_orig_mod.`).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Which state dict of a training checkpoint holds the weights, in order of preference. The public
# prior was converted from `ema_state_dict`, the decoder and the VQGAN from `state_dict`.
DEFAULT_STATE_KEYS = ("ema_state_dict", "state_dict")


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def from_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames and splits original keys into the diffusers layout."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        key = _strip_wrappers(key)
        if key.endswith("attn.in_proj_weight") or key.endswith("attn.in_proj_bias"):
            kind = "weight" if key.endswith("weight") else "bias"
            stem = key[: -len(f"attn.in_proj_{kind}")]
            q, k, v = tensor.chunk(3, dim=0)
            out[f"{stem}to_q.{kind}"], out[f"{stem}to_k.{kind}"], out[f"{stem}to_v.{kind}"] = q, k, v
        elif "attn.out_proj." in key:
            out[key.replace("attn.out_proj.", "to_out.0.")] = tensor
        elif key == "vquantizer.codebook.weight":
            out["vquantizer.embedding.weight"] = tensor
        else:
            out[key] = tensor
    return out


def to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `from_original`: packs q/k/v into `attn.in_proj_*`."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        for kind in ("weight", "bias"):
            if key.endswith(f"to_q.{kind}"):
                stem = key[: -len(f"to_q.{kind}")]
                parts = [state_dict[f"{stem}to_{p}.{kind}"] for p in "qkv"]
                out[f"{stem}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
        if key.endswith((".to_k.weight", ".to_k.bias", ".to_v.weight", ".to_v.bias", ".to_q.weight", ".to_q.bias")):
            continue
        if ".to_out.0." in key:
            out[key.replace("to_out.0.", "attn.out_proj.")] = tensor
        elif key == "vquantizer.embedding.weight":
            out["vquantizer.codebook.weight"] = tensor
        else:
            out[key] = tensor
    return out


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        try:  # memory-mapped: a multi-GB training checkpoint is not read whole
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as err:
        raise ValueError(
            f"{path} could not be read as a tensors-only torch checkpoint ({type(err).__name__}: {err}); "
            f"files that need arbitrary unpickling are refused"
        ) from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a dict of state dicts")
    return checkpoint


def _pick_state(checkpoint: dict[str, Any], path: Path, keys: tuple[str, ...]) -> tuple[dict, str]:
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint, str(path)  # a bare state dict
    for key in keys:
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key], f"{path}[{key!r}]"
    raise KeyError(f"{path} has none of the state dicts {list(keys)}; its top-level keys are {sorted(checkpoint)}")


def load_original(
    cls: type[PretrainedModel],
    path: str | Path,
    flavor: str = "v2",
    config: Any = None,
    state_keys: tuple[str, ...] = DEFAULT_STATE_KEYS,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> PretrainedModel:
    """A StageC / StageB / StageA from an original `.pt` checkpoint (which carries no config: the
    flavor or an explicit config says the size), in eval mode."""
    path = Path(path)
    state, source = _pick_state(read_checkpoint(path), path, state_keys)
    with torch.device("meta"):
        model = cls(config if config is not None else cls.flavor_config(flavor))
    load_state_dict_strict(model, from_original(state), source, dtype=dtype or torch.float32, device=device)
    return model.eval()


def load_original_semantic_compressor(
    path: str | Path, flavor: str = "v2", dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> SemanticCompressor:
    """The semantic compressor from the `effnet_state_dict` of an original Stage B checkpoint
    (`model_v2_stage_b.pt`), loaded strictly."""
    return load_original(
        SemanticCompressor, path, flavor=flavor, state_keys=("effnet_state_dict",), dtype=dtype, device=device
    )
