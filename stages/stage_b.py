"""Stage B, the diffusion decoder "DiffNeXt" (diffusers' WuerstchenDiffNeXt).

A U-Net over the Stage A latent (4 channels, 256x256 for a 1024 px image) conditioned on the
semantic latent e (16 channels) and on CLIP-H text tokens. The semantic latent is resized to each
level that injects it and enters every ResBlock of that level as a skip.
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from stages.blocks import (
    LAYER_NORM_EPS,
    AttnBlock,
    LayerNorm2d,
    ResBlockStageB,
    TimestepBlock,
    gen_r_embedding,
)
from stages.pretrained import PretrainedModel

# The head's scale b is squashed into [eps, 1 - eps] (diffusers' default eps=1e-3).
_B_EPS = 1e-3


@dataclasses.dataclass(frozen=True)
class StageBConfig:
    c_in: int = 4
    c_out: int = 4
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 1024  # width of the mapped text tokens that every AttnBlock attends to
    c_hidden: tuple[int, ...] = (320, 640, 1280, 1280)
    nhead: tuple[int, ...] = (-1, 10, 20, 20)  # -1: the level has no attention
    blocks: tuple[int, ...] = (4, 4, 14, 4)
    level_config: tuple[str, ...] = ("CT", "CTA", "CTA", "CTA")  # C ResBlock, T TimestepBlock, A AttnBlock
    inject_effnet: tuple[bool, ...] = (False, True, True, True)
    effnet_embd: int = 16  # semantic latent channels
    clip_embd: int = 1024  # width of the text encoder's tokens (CLIP-H)
    kernel_size: int = 3
    dropout: float | tuple[float, ...] = 0.1

    def __post_init__(self):
        for name in ("c_hidden", "nhead", "blocks", "level_config", "inject_effnet", "dropout"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        levels = len(self.c_hidden)
        for name in ("nhead", "blocks", "level_config", "inject_effnet"):
            if len(getattr(self, name)) != levels:
                raise ValueError(f"StageBConfig.{name} has {len(getattr(self, name))} entries; c_hidden has {levels} levels")

    def level_dropout(self) -> tuple[float, ...]:
        return self.dropout if isinstance(self.dropout, tuple) else (self.dropout,) * len(self.c_hidden)


class StageB(PretrainedModel):
    config_class = StageBConfig
    flavors = {
        "tiny": StageBConfig(
            c_cond=32,
            c_hidden=(16, 32),
            nhead=(-1, 2),
            blocks=(1, 1),
            level_config=("CT", "CTA"),
            inject_effnet=(False, True),
            clip_embd=32,
        ),
        "small": StageBConfig(
            c_cond=128,
            c_hidden=(32, 64, 128, 128),
            nhead=(-1, 2, 4, 4),
            blocks=(1, 1, 2, 1),
            clip_embd=128,
        ),
        # warp-ai/wuerstchen decoder/config.json (equal to diffusers' class defaults).
        "v2": StageBConfig(),
    }
    diffusers_class_name = "WuerstchenDiffNeXt"
    diffusers_defaults = {f.name: f.default for f in dataclasses.fields(StageBConfig)}
    default_subfolder = "decoder"

    def __init__(self, config: StageBConfig = StageBConfig()):
        super().__init__(config)
        cfg = config
        levels = len(cfg.c_hidden)
        dropout = cfg.level_dropout()
        self.clip_mapper = nn.Linear(cfg.clip_embd, cfg.c_cond)
        # One mapper per level and direction (down 0..L-1, then up L-1..0); None where nothing is injected.
        self.effnet_mappers = nn.ModuleList(
            [
                nn.Conv2d(cfg.effnet_embd, cfg.c_cond, kernel_size=1) if inject else None
                for inject in cfg.inject_effnet + tuple(reversed(cfg.inject_effnet))
            ]
        )
        self.seq_norm = nn.LayerNorm(cfg.c_cond, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(cfg.patch_size),
            nn.Conv2d(cfg.c_in * cfg.patch_size**2, cfg.c_hidden[0], kernel_size=1),
            LayerNorm2d(cfg.c_hidden[0]),
        )

        def block(kind: str, level: int, c_skip: int) -> nn.Module:
            c = cfg.c_hidden[level]
            if kind == "C":
                return ResBlockStageB(c, c_skip, kernel_size=cfg.kernel_size, dropout=dropout[level])
            if kind == "T":
                return TimestepBlock(c, cfg.c_r)
            if kind == "A":
                return AttnBlock(c, cfg.c_cond, cfg.nhead[level], self_attn=True, dropout=dropout[level])
            raise ValueError(f"StageBConfig.level_config has block type {kind!r}; known types are C, T and A")

        self.down_blocks = nn.ModuleList()
        for i in range(levels):
            down = nn.ModuleList()
            if i > 0:
                down.append(
                    nn.Sequential(
                        LayerNorm2d(cfg.c_hidden[i - 1]),
                        nn.Conv2d(cfg.c_hidden[i - 1], cfg.c_hidden[i], kernel_size=2, stride=2),
                    )
                )
            effnet_skip = cfg.c_cond if cfg.inject_effnet[i] else 0
            for _ in range(cfg.blocks[i]):
                for kind in cfg.level_config[i]:
                    down.append(block(kind, i, effnet_skip))
            self.down_blocks.append(down)

        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            up = nn.ModuleList()
            effnet_skip = cfg.c_cond if cfg.inject_effnet[i] else 0
            for j in range(cfg.blocks[i]):
                for k, kind in enumerate(cfg.level_config[i]):
                    # The first block of every level below the bottom one also takes the down path's output.
                    level_skip = cfg.c_hidden[i] if i < levels - 1 and j == k == 0 else 0
                    up.append(block(kind, i, level_skip + effnet_skip))
            if i > 0:
                up.append(
                    nn.Sequential(
                        LayerNorm2d(cfg.c_hidden[i]),
                        nn.ConvTranspose2d(cfg.c_hidden[i], cfg.c_hidden[i - 1], kernel_size=2, stride=2),
                    )
                )
            self.up_blocks.append(up)

        self.clf = nn.Sequential(
            LayerNorm2d(cfg.c_hidden[0]),
            nn.Conv2d(cfg.c_hidden[0], 2 * cfg.c_out * cfg.patch_size**2, kernel_size=1),
            nn.PixelShuffle(cfg.patch_size),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """The original training's init (as diffusers' class does it): xavier-uniform with zero bias,
        conditioning mappers N(0, 0.02), a zero output conv, each ResBlock's last Linear scaled by
        sqrt(1 / sum(blocks)), zero TimestepBlocks. Loaded checkpoints overwrite all of it."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for mapper in self.effnet_mappers:
            if mapper is not None:
                nn.init.normal_(mapper.weight, std=0.02)
        nn.init.normal_(self.clip_mapper.weight, std=0.02)
        nn.init.xavier_uniform_(self.embedding[1].weight, 0.02)
        nn.init.zeros_(self.clf[1].weight)
        for level in list(self.down_blocks) + list(self.up_blocks):
            for block in level:
                if isinstance(block, ResBlockStageB):
                    block.channelwise[-1].weight.data *= (1 / sum(self.config.blocks)) ** 0.5
                elif isinstance(block, TimestepBlock):
                    nn.init.zeros_(block.mapper.weight)

    def _effnet_map(self, index: int, effnet: torch.Tensor, size: torch.Size) -> torch.Tensor | None:
        mapper = self.effnet_mappers[index]
        if mapper is None:
            return None
        # Resized in float32, bicubic with antialias and align_corners, as the checkpoint was trained.
        resized = F.interpolate(effnet.float(), size=size, mode="bicubic", antialias=True, align_corners=True)
        return mapper(resized.to(effnet.dtype))

    def _run(self, block: nn.Module, x: torch.Tensor, r_embed, clip, skip=None) -> torch.Tensor:
        if isinstance(block, ResBlockStageB):
            return block(x) if skip is None else block(x, skip)
        if isinstance(block, AttnBlock):
            return block(x, clip)
        if isinstance(block, TimestepBlock):
            return block(x, r_embed)
        return block(x)  # the down/up samplers

    def forward(
        self, x: torch.Tensor, r: torch.Tensor, effnet: torch.Tensor, clip: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted noise for Stage A latents x (B, 4, h, w) at noise levels r (B,), given the semantic
        latent effnet (B, 16, h', w') and text tokens clip (B, L, clip_embd)."""
        r_embed = gen_r_embedding(r, self.config.c_r)
        if clip is not None:
            clip = self.seq_norm(self.clip_mapper(clip))
        x_in = x
        x = self.embedding(x)

        levels = len(self.down_blocks)
        level_outputs = []
        for i, down in enumerate(self.down_blocks):
            effnet_c = None
            for block in down:
                if isinstance(block, ResBlockStageB) and effnet_c is None:
                    effnet_c = self._effnet_map(i, effnet, x.shape[-2:])
                x = self._run(block, x, r_embed, clip, effnet_c)
            level_outputs.insert(0, x)

        x = level_outputs[0]
        for i, up in enumerate(self.up_blocks):
            effnet_c = None
            for j, block in enumerate(up):
                if isinstance(block, ResBlockStageB):
                    if effnet_c is None:
                        effnet_c = self._effnet_map(levels + i, effnet, x.shape[-2:])
                    skips = [level_outputs[i]] if j == 0 and i > 0 else []
                    skips += [effnet_c] if effnet_c is not None else []
                    x = self._run(block, x, r_embed, clip, torch.cat(skips, dim=1) if skips else None)
                else:
                    x = self._run(block, x, r_embed, clip)

        a, b = self.clf(x).chunk(2, dim=1)
        b = b.sigmoid() * (1 - 2 * _B_EPS) + _B_EPS
        return (x_in - a) / b
