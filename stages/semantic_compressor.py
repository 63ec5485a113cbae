"""The semantic compressor: EfficientNetV2-S features + a 1x1 conv to 16 channels + BatchNorm.

Its output e (16 x H/32 x W/32) is what Stage B is conditioned on; Stage C learns z_C = (e + 1) / 42.
The image goes in at 0.75x the Stage A resolution (1024 px -> 768 px -> 24x24). Key names are those
of the original `effnet_state_dict` (backbone.*, mapper.*), so it loads strictly.
"""

import dataclasses
from functools import partial

import torch
from torch import nn

from stages.pretrained import PretrainedModel

# ImageNet statistics: the backbone was pre-trained on normalised inputs; only it sees them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Reduced EfficientNetV2 backbones (same block types, same stride 32) for tests and CPU demos: torchvision's
# stage settings (block type, expand ratio, kernel, stride, in, out, layers). torchvision is imported
# only to build a backbone: its models package imports torch's compiler stack (~2 s of CPU), which
# every process that imports `stages` (each Ray Train worker) would pay otherwise.
_REDUCED_BACKBONES = {
    "efficientnet_tiny": [
        ("fused", 1, 3, 1, 8, 8, 1),
        ("fused", 2, 3, 2, 8, 16, 1),
        ("fused", 2, 3, 2, 16, 24, 1),
        ("mb", 2, 3, 2, 24, 32, 1),
        ("mb", 2, 3, 2, 32, 48, 1),
    ],
    "efficientnet_small": [
        ("fused", 1, 3, 1, 16, 16, 1),
        ("fused", 4, 3, 2, 16, 32, 2),
        ("fused", 4, 3, 2, 32, 48, 2),
        ("mb", 4, 3, 2, 48, 96, 2),
        ("mb", 4, 3, 1, 96, 112, 2),
        ("mb", 4, 3, 2, 112, 160, 2),
    ],
}
_TORCHVISION_BACKBONES = ("efficientnet_v2_s", "efficientnet_v2_l")


@dataclasses.dataclass(frozen=True)
class SemanticCompressorConfig:
    c_latent: int = 16
    c_cond: int = 1280  # channels of the backbone's last feature map
    effnet: str = "efficientnet_v2_s"


def build_backbone(config: SemanticCompressorConfig, imagenet_weights: bool = False) -> nn.Module:
    """The `.features` of an EfficientNet; ImageNet weights are downloaded by torchvision when asked."""
    from torchvision.models import efficientnet

    if config.effnet in _TORCHVISION_BACKBONES:
        if config.c_cond != 1280:
            raise ValueError(f"{config.effnet} ends in 1280 channels; SemanticCompressorConfig.c_cond is {config.c_cond}")
        weights = "DEFAULT" if imagenet_weights else None
        return getattr(efficientnet, config.effnet)(weights=weights).features
    if config.effnet in _REDUCED_BACKBONES:
        if imagenet_weights:
            raise ValueError(f"there are no ImageNet weights for the reduced backbone {config.effnet!r}")
        block = {"fused": efficientnet.FusedMBConvConfig, "mb": efficientnet.MBConvConfig}
        net = efficientnet.EfficientNet(
            [block[kind](*settings) for kind, *settings in _REDUCED_BACKBONES[config.effnet]],
            dropout=0.0,
            last_channel=config.c_cond,
            norm_layer=partial(nn.BatchNorm2d, eps=1e-3),
        )
        return net.features
    known = sorted(_TORCHVISION_BACKBONES) + sorted(_REDUCED_BACKBONES)
    raise ValueError(f"unknown SemanticCompressorConfig.effnet {config.effnet!r}; known: {known}")


class SemanticCompressor(PretrainedModel):
    config_class = SemanticCompressorConfig
    flavors = {
        "tiny": SemanticCompressorConfig(c_cond=64, effnet="efficientnet_tiny"),
        "small": SemanticCompressorConfig(c_cond=256, effnet="efficientnet_small"),
        "v2": SemanticCompressorConfig(),
    }
    # The class of diffusers' Würstchen training example (examples/research_projects/wuerstchen).
    diffusers_class_name = "EfficientNetEncoder"
    diffusers_defaults = {f.name: f.default for f in dataclasses.fields(SemanticCompressorConfig)}
    default_subfolder = None

    def __init__(self, config: SemanticCompressorConfig = SemanticCompressorConfig(), imagenet_weights: bool = False):
        super().__init__(config)
        self.backbone = build_backbone(config, imagenet_weights)
        self.mapper = nn.Sequential(
            nn.Conv2d(config.c_cond, config.c_latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(config.c_latent),  # e comes out with roughly mean 0, std 1
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) RGB in [0, 1] -> semantic latents e (B, c_latent, H/32, W/32)."""
        mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return self.mapper(self.backbone((images - mean) / std))
