"""What every Würstchen model here has: a config dataclass, named flavors, and the diffusers folder
format (`save_pretrained` / `from_pretrained`)."""

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from torch import nn

from stages import diffusers_format


class PretrainedModel(nn.Module):
    """Base of StageC, StageB, StageA and SemanticCompressor.

    Subclasses set:
      config_class: the dataclass holding the constructor arguments (diffusers' names);
      flavors: named configs: "tiny" for tests, "small" for CPU demos, "v2" for the public checkpoints;
      diffusers_class_name: the `_class_name` diffusers writes into config.json;
      diffusers_defaults: diffusers' class defaults, for keys an older config.json leaves out;
      default_subfolder: where the model sits in the public hub repositories.
    """

    config_class: ClassVar[type]
    flavors: ClassVar[dict[str, Any]]
    diffusers_class_name: ClassVar[str]
    diffusers_defaults: ClassVar[dict[str, Any]]
    default_subfolder: ClassVar[str | None] = None

    def __init__(self, config: Any):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    @classmethod
    def flavor_config(cls, flavor: str, **overrides: Any) -> Any:
        if flavor not in cls.flavors:
            raise ValueError(f"unknown {cls.__name__} flavor {flavor!r}; known flavors: {sorted(cls.flavors)}")
        return dataclasses.replace(cls.flavors[flavor], **overrides)

    @classmethod
    def from_flavor(cls, flavor: str, **overrides: Any) -> Self:
        """A randomly initialised model of a named size; overrides replace single config fields."""
        return cls(cls.flavor_config(flavor, **overrides))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Writes config.json + diffusion_pytorch_model.safetensors, as diffusers does."""
        return diffusers_format.save_folder(self, directory, dtype=dtype)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        subfolder: str | None = None,
        revision: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        variant: str | None = None,
    ) -> Self:
        """Loads a diffusers-format folder (local path or hub id), in eval mode."""
        return diffusers_format.load_folder(
            cls, path_or_hub_id, subfolder=subfolder, revision=revision, dtype=dtype, device=device, variant=variant
        )
