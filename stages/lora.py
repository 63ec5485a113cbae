"""LoRA adapters on a stage's attention projections, through `peft`, and their file in the format
diffusers loads (`WuerstchenPriorPipeline.load_lora_weights(folder)`).

An adapted model keeps its class and its base weights, frozen: each targeted `nn.Linear` becomes a
peft `lora.Linear` holding the base layer (`to_q.base_layer.weight`) and the adapter
(`to_q.lora_A.default.weight`, `to_q.lora_B.default.weight`, B zero at the start: the adapted model
starts as its base). The adapter alone is what a fine-tune trains, saves and ships.

The file: `pytorch_lora_weights.safetensors`, peft's keys without the adapter name under the
pipeline component's prefix (`prior.blocks.2.attention.to_q.lora_A.weight`), and the adapter's
LoraConfig in the safetensors metadata (`lora_adapter_metadata`, each key under the same prefix),
which diffusers reads for rank and alpha.
"""

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

# diffusers' LoRA prior script's targets that exist in the prior (its add_k_proj / add_v_proj do not):
# every attention's query, key, value and output projection. Stage B's attention has the same names.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
ADAPTER = "default"  # peft's name of the one adapter
# The pipeline component each stage is under in the file (diffusers' unet_name of the prior pipeline;
# diffusers has no LoRA loader for the decoder, whose file our loader reads alike).
PREFIXES = {"StageC": "prior", "StageB": "decoder"}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """An adapter's shape: rank, alpha (the update is scaled by alpha / rank), dropout on its input,
    and the module names it adapts."""

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):  # one spelling of a set of targets: sorted
        object.__setattr__(self, "target_modules", tuple(sorted(self.target_modules)))

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), init_lora_weights=True)

    def metadata(self) -> dict:
        """The LoraConfig fields diffusers builds the adapter from (rank, alpha, targets, dropout)."""
        return {"r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": list(self.target_modules), "init_lora_weights": True, "bias": "none",
                "use_dora": False, "use_rslora": False}

    @classmethod
    def from_metadata(cls, meta: dict) -> "LoraSpec":
        return cls(rank=int(meta["r"]), alpha=float(meta["lora_alpha"]), dropout=float(meta.get("lora_dropout", 0.0)),
                   target_modules=tuple(meta["target_modules"]))


def add_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Adds an adapter of `spec` to `model` in place; only the adapter's parameters train afterwards."""
    from peft import inject_adapter_in_model

    if is_adapted(model):
        raise ValueError(f"{type(model).__name__} already has a LoRA adapter")
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in spec.target_modules if not any(n == t or n.endswith("." + t) for n in names)]  # peft's matching
    if missing:
        raise ValueError(f"LoRA target modules {missing} are not in {type(model).__name__} (its attention has {list(LORA_TARGETS)})")
    inject_adapter_in_model(spec.peft_config(), model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_key(name))
    return model


def is_adapter_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def is_adapted(model: nn.Module) -> bool:
    return any(is_adapter_key(name) for name, _ in model.named_parameters())


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's tensors of an adapted model's state dict, under the file's names (peft's,
    without the adapter name: `blocks.2.attention.to_q.lora_A.weight`)."""
    return {name.replace(f".{ADAPTER}.", "."): t for name, t in state.items() if is_adapter_key(name)}


def model_keys(adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An adapter's tensors under an adapted model's state-dict names (the inverse of `adapter_state`)."""
    out = {}
    for name, t in adapter.items():
        module, part, leaf = name.rsplit(".", 2)
        out[f"{module}.{part}.{ADAPTER}.{leaf}"] = t
    return out


def base_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's state dict of an adapted model's (peft's `base_layer.` names back to the plain ones)."""
    return {name.replace(".base_layer.", "."): t for name, t in state.items() if not is_adapter_key(name)}


@torch.no_grad()
def merge_into(model: nn.Module, adapter: dict[str, torch.Tensor], spec: LoraSpec) -> nn.Module:
    """Merges an adapter (the file's names) into a plain model's weights, in place: what the adapted
    model computes, as a model of the base's own class and keys (for sampling, exporting, fine-tuning)."""
    scale = spec.alpha / spec.rank
    for name, a in adapter.items():
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0]
        weight = model.get_submodule(module).weight
        update = adapter[f"{module}.lora_B.weight"].float() @ a.float()
        weight.copy_((weight.float() + scale * update.to(weight.device)).to(weight.dtype))
    return model


def load_adapter(model: nn.Module, adapter: dict[str, torch.Tensor]) -> None:
    """Loads adapter tensors (the file's names) into an adapted model; every adapter tensor of the
    model must be given, and nothing else."""
    own = {name for name in model.state_dict() if is_adapter_key(name)}
    given = model_keys(adapter)
    if set(given) != own:
        raise ValueError(f"the adapter does not fit {type(model).__name__}'s: missing {sorted(own - set(given))[:4]}, "
                         f"unexpected {sorted(set(given) - own)[:4]}")
    model.load_state_dict(given, strict=False)


def prefix_of(model_or_class) -> str:
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    for klass in cls.__mro__:
        if klass.__name__ in PREFIXES:
            return PREFIXES[klass.__name__]
    raise ValueError(f"no LoRA file prefix for {cls.__name__}: adapters are for Stage C and Stage B")


def save(folder: str | Path, adapter: dict[str, torch.Tensor], spec: LoraSpec, prefix: str) -> Path:
    """Writes `folder/pytorch_lora_weights.safetensors` (the adapter's tensors, as `adapter_state`
    names them) in diffusers' layout."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt",
                METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in spec.metadata().items()}, sort_keys=True)}
    path = folder / WEIGHTS_NAME
    save_file({f"{prefix}.{k}": t.detach().cpu().contiguous() for k, t in adapter.items()}, str(path), metadata=metadata)
    return path


def load(folder: str | Path) -> tuple[dict[str, torch.Tensor], LoraSpec, str]:
    """(adapter tensors without the prefix, spec, prefix) of a folder `save` wrote."""
    from safetensors import safe_open

    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no LoRA adapter ({WEIGHTS_NAME})")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    prefixes = {k.split(".", 1)[0] for k in tensors}
    if len(prefixes) != 1 or not meta:
        raise ValueError(f"{path}: not one adapter with its {METADATA_KEY} (prefixes {sorted(prefixes)})")
    prefix = prefixes.pop()
    spec = LoraSpec.from_metadata({k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith(prefix + ".")})
    return {k.split(".", 1)[1]: t for k, t in tensors.items()}, spec, prefix
