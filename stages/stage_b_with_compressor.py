"""Stage B trained together with the semantic compressor that conditions it: one module, so that
one optimizer, one EMA and one data-parallel wrapper cover both (how Würstchen v1 trained its
decoder: the EfficientNet and Stage B in one module under DDP, with one AdamW). The compressor
learns to encode what Stage B needs to redraw the image; its weights then go with the decoders, and
the prior's latents must be made with them.

Saved as two diffusers folders side by side, each loadable alone: decoder/ (Stage B, what the
sampler and diffusers' pipeline load) and semantic_compressor/ (what prep's encode.semantic.path
takes to make the prior's cache).
"""

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from torch import nn

from stages.semantic_compressor import SemanticCompressor, SemanticCompressorConfig
from stages.stage_b import StageB, StageBConfig

DECODER_FOLDER = "decoder"
COMPRESSOR_FOLDER = "semantic_compressor"


@dataclasses.dataclass(frozen=True)
class StageBWithCompressorConfig:
    stage_b: StageBConfig
    semantic_compressor: SemanticCompressorConfig


class StageBWithCompressor(nn.Module):
    config_class: ClassVar[type] = StageBWithCompressorConfig
    flavors: ClassVar[dict[str, StageBWithCompressorConfig]] = {
        name: StageBWithCompressorConfig(StageB.flavors[name], SemanticCompressor.flavors[name])
        for name in StageB.flavors if name in SemanticCompressor.flavors
    }

    def __init__(self, config: StageBWithCompressorConfig):
        super().__init__()
        if not isinstance(config, StageBWithCompressorConfig):
            raise TypeError(f"StageBWithCompressor takes a StageBWithCompressorConfig, got {type(config).__name__}")
        self.config = config
        self.stage_b = StageB(config.stage_b)
        self.semantic_compressor = SemanticCompressor(config.semantic_compressor)

    @classmethod
    def flavor_config(cls, flavor: str, **stage_b_overrides: Any) -> StageBWithCompressorConfig:
        """The flavor's pair; overrides are fields of Stage B's config (the compressor is the flavor's)."""
        if flavor not in cls.flavors:
            raise ValueError(f"unknown {cls.__name__} flavor {flavor!r}; known flavors: {sorted(cls.flavors)}")
        config = cls.flavors[flavor]
        return dataclasses.replace(config, stage_b=dataclasses.replace(config.stage_b, **stage_b_overrides))

    @classmethod
    def from_parts(cls, stage_b: StageB, semantic_compressor: SemanticCompressor) -> Self:
        """The two trained (or pretrained) models as one, their weights kept."""
        with torch.device("meta"):
            model = cls(StageBWithCompressorConfig(stage_b.config, semantic_compressor.config))
        model.stage_b, model.semantic_compressor = stage_b, semantic_compressor
        return model

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, r: torch.Tensor, images: torch.Tensor, clip: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """Stage B's noise prediction for x at r, conditioned on the semantic latent e the compressor
        makes of `images` (B, 3, H, W) in [0, 1], at its input size; `keep` (B,): 0 drops a row's e
        to zeros (the recipe's condition dropout, and what the sampler's unconditional branch gives)."""
        e = self.semantic_compressor(images)
        if keep is not None:
            e = e * keep.to(e.device, e.dtype).view(-1, 1, 1, 1)
        return self.stage_b(x, r, e, clip)

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        directory = Path(directory)
        self.stage_b.save_pretrained(directory / DECODER_FOLDER, dtype=dtype)
        self.semantic_compressor.save_pretrained(directory / COMPRESSOR_FOLDER, dtype=dtype)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu") -> Self:
        """Both folders of `directory`, in eval mode."""
        directory = Path(directory)
        return cls.from_parts(StageB.from_pretrained(directory / DECODER_FOLDER, dtype=dtype, device=device),
                              SemanticCompressor.from_pretrained(directory / COMPRESSOR_FOLDER, dtype=dtype, device=device)).eval()
