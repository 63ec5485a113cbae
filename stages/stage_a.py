"""Stage A, the Paella VQGAN with a spatial compression of 4 (diffusers' PaellaVQModel).

`encode` returns the pre-quantization BatchNorm output h; Würstchen v2 uses Stage A as a VAE: the
Stage B diffusion space is h / scale_factor, and `decode` runs on unquantized latents by default.
Images are RGB in [0, 1].
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from stages.blocks import LAYER_NORM_EPS
from stages.latents import STAGE_A_SCALE_FACTOR
from stages.pretrained import PretrainedModel

# Commitment weight of the quantizer loss (diffusers VectorQuantizer beta, original Paella VQGAN).
VQ_BETA = 0.25


@dataclasses.dataclass(frozen=True)
class StageAConfig:
    in_channels: int = 3
    out_channels: int = 3
    up_down_scale_factor: int = 2
    levels: int = 2
    bottleneck_blocks: int = 12
    embed_dim: int = 384
    latent_channels: int = 4
    num_vq_embeddings: int = 8192
    scale_factor: float = STAGE_A_SCALE_FACTOR  # Stage B space = encoder output / scale_factor


class MixingResidualBlock(nn.Module):
    """Two gated residual branches (depthwise conv, channel MLP); the six gammas start at zero."""

    def __init__(self, c: int, c_hidden: int):
        super().__init__()
        self.c = c
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:  # channels-last in, channels-last out
        return F.layer_norm(x, (self.c,), eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gammas
        h = self._norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * (1 + g[0]) + g[1]
        x = x + self.depthwise(h) * g[2]
        h = self._norm(x.permute(0, 2, 3, 1)) * (1 + g[3]) + g[4]
        return x + self.channelwise(h).permute(0, 3, 1, 2) * g[5]


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantizer with a straight-through gradient (key `embedding.weight`)."""

    def __init__(self, num_embeddings: int, dim: int, beta: float = VQ_BETA):
        super().__init__()
        self.beta = beta
        # The codebook starts where the encoder's BatchNorm'd latents are: N(0, 1). (diffusers' init,
        # uniform in +-1/n, leaves every latent about 1 from every code: trained from scratch, the
        # codebook term then dominates the loss for the first thousands of steps.) Loaded weights
        # replace it; only a Stage A trained from scratch sees it.
        self.embedding = nn.Embedding(num_embeddings, dim)
        nn.init.normal_(self.embedding.weight)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (quantized z, codebook + commitment loss, indices (B, H, W))."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        indices = torch.cdist(flat, self.embedding.weight).argmin(dim=1)
        z_q = self.embedding(indices).view(b, h, w, c).permute(0, 3, 1, 2)
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z_q.detach(), z)
        z_q = z + (z_q - z).detach()
        return z_q, loss, indices.view(b, h, w)


class StageA(PretrainedModel):
    config_class = StageAConfig
    flavors = {
        "tiny": StageAConfig(bottleneck_blocks=1, embed_dim=32, num_vq_embeddings=64),
        "small": StageAConfig(bottleneck_blocks=4, embed_dim=96, num_vq_embeddings=1024),
        # warp-ai/wuerstchen vqgan/config.json (equal to diffusers' class defaults).
        "v2": StageAConfig(),
    }
    diffusers_class_name = "PaellaVQModel"
    diffusers_defaults = {f.name: f.default for f in dataclasses.fields(StageAConfig)}
    default_subfolder = "vqgan"

    def __init__(self, config: StageAConfig = StageAConfig()):
        super().__init__(config)
        cfg = config
        f = cfg.up_down_scale_factor
        c_levels = [cfg.embed_dim // (2**i) for i in reversed(range(cfg.levels))]
        self.in_block = nn.Sequential(nn.PixelUnshuffle(f), nn.Conv2d(cfg.in_channels * f**2, c_levels[0], kernel_size=1))
        down = []
        for i in range(cfg.levels):
            if i > 0:
                down.append(nn.Conv2d(c_levels[i - 1], c_levels[i], kernel_size=4, stride=2, padding=1))
            down.append(MixingResidualBlock(c_levels[i], c_levels[i] * 4))
        down.append(
            nn.Sequential(
                nn.Conv2d(c_levels[-1], cfg.latent_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(cfg.latent_channels),  # latents normalised to mean 0, std 1
            )
        )
        self.down_blocks = nn.Sequential(*down)
        self.vquantizer = VectorQuantizer(cfg.num_vq_embeddings, cfg.latent_channels)

        up = [nn.Sequential(nn.Conv2d(cfg.latent_channels, c_levels[-1], kernel_size=1))]
        for i in range(cfg.levels):
            c = c_levels[cfg.levels - 1 - i]
            for _ in range(cfg.bottleneck_blocks if i == 0 else 1):
                up.append(MixingResidualBlock(c, c * 4))
            if i < cfg.levels - 1:
                up.append(nn.ConvTranspose2d(c, c_levels[cfg.levels - 2 - i], kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(
            nn.Conv2d(c_levels[0], cfg.out_channels * f**2, kernel_size=1), nn.PixelShuffle(f)
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> pre-quantization latents h (B, 4, H/4, W/4)."""
        return self.down_blocks(self.in_block(x))

    def decode(self, h: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Latents h (encoder space, not divided by scale_factor) -> images; unclamped."""
        if quantize:
            h, _, _ = self.vquantizer(h)
        return self.out_block(self.up_blocks(h))

    def forward(self, x: torch.Tensor, quantize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (reconstruction, the quantizer's codebook + commitment loss): what training
        calls (through forward, so that DDP and FSDP2 see it). quantize=False: the decoder reads the
        encoder's output directly, as Würstchen v2 decodes Stage B's latents; the loss is then 0."""
        h = self.encode(x)
        vq_loss = h.new_zeros(())
        if quantize:
            h, vq_loss, _ = self.vquantizer(h)
        return self.decode(h), vq_loss
