"""Stage C, the text-conditional prior (diffusers' WuerstchenPrior).

It denoises the 16-channel semantic latent z_C (16x24x24 for a 1024 px image), conditioned on
CLIP-bigG text tokens. No down- or up-sampling: `depth` triplets of ResBlock, TimestepBlock and
AttnBlock at the latent's resolution.
"""

import dataclasses

import torch
from torch import nn

from stages.blocks import AttnBlock, LayerNorm2d, ResBlock, TimestepBlock, gen_r_embedding
from stages.pretrained import PretrainedModel


@dataclasses.dataclass(frozen=True)
class StageCConfig:
    c_in: int = 16  # semantic latent channels
    c: int = 1536  # width of the trunk
    c_cond: int = 1280  # width of the text encoder's tokens (CLIP-bigG)
    c_r: int = 64  # width of the noise-level embedding
    depth: int = 32  # number of (ResBlock, TimestepBlock, AttnBlock) triplets
    nhead: int = 24
    dropout: float = 0.1


class StageC(PretrainedModel):
    config_class = StageCConfig
    flavors = {
        "tiny": StageCConfig(c=32, c_cond=32, depth=2, nhead=2),
        "small": StageCConfig(c=256, c_cond=384, depth=4, nhead=4),
        # warp-ai/wuerstchen-prior prior/config.json (also -model-finetuned, -model-interpolated).
        "v2": StageCConfig(),
    }
    diffusers_class_name = "WuerstchenPrior"
    # diffusers' class defaults differ from the public checkpoint: a config.json that omits a key means these.
    diffusers_defaults = dict(c_in=16, c=1280, c_cond=1024, c_r=64, depth=16, nhead=16, dropout=0.1)
    default_subfolder = "prior"

    def __init__(self, config: StageCConfig = StageCConfig()):
        super().__init__(config)
        c = config.c
        self.projection = nn.Conv2d(config.c_in, c, kernel_size=1)
        self.cond_mapper = nn.Sequential(nn.Linear(config.c_cond, c), nn.LeakyReLU(0.2), nn.Linear(c, c))
        self.blocks = nn.ModuleList()
        for _ in range(config.depth):
            self.blocks.append(ResBlock(c, dropout=config.dropout))
            self.blocks.append(TimestepBlock(c, config.c_r))
            # The keys and values come from the already mapped condition, so its width is c.
            self.blocks.append(AttnBlock(c, c, config.nhead, self_attn=True, dropout=config.dropout))
        self.out = nn.Sequential(LayerNorm2d(c), nn.Conv2d(c, config.c_in * 2, kernel_size=1))
        self.apply(self._init_weights)
        self._init_output_and_gates()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _init_output_and_gates(self) -> None:
        """The original training's init: conditioning mappers N(0, 0.02), a zero output conv (so the
        untrained model predicts eps = x), each ResBlock's last Linear scaled by sqrt(1 / depth), and
        zero TimestepBlocks. Loaded checkpoints overwrite all of it."""
        nn.init.normal_(self.cond_mapper[0].weight, std=0.02)
        nn.init.normal_(self.cond_mapper[-1].weight, std=0.02)
        nn.init.zeros_(self.out[-1].weight)
        for block in self.blocks:
            if isinstance(block, ResBlock):
                block.channelwise[-1].weight.data *= (1 / self.config.depth) ** 0.5
            elif isinstance(block, TimestepBlock):
                nn.init.zeros_(block.mapper.weight)

    def forward(self, x: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Predicted noise for latents x (B, c_in, H, W) at noise levels r (B,) given text tokens c (B, L, c_cond)."""
        x_in = x
        x = self.projection(x)
        c_embed = self.cond_mapper(c)
        r_embed = gen_r_embedding(r, self.config.c_r)
        for block in self.blocks:
            if isinstance(block, AttnBlock):
                x = block(x, c_embed)
            elif isinstance(block, TimestepBlock):
                x = block(x, r_embed)
            else:
                x = block(x)
        a, b = self.out(x).chunk(2, dim=1)
        return (x_in - a) / ((1 - b).abs() + 1e-5)
