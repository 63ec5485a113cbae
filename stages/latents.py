"""The latent spaces and how their sizes follow from the image size: one place for each constant.

    image (3, H, W) in [0, 1]
      -> semantic compressor at 0.75 x H  -> e (16, ~H/42.67, ~W/42.67)   Stage B's condition
      -> z_C = (e + 1) / 42                                                 what Stage C learns
      -> Stage A encoder                  -> h (4, H/4, W/4)
      -> z_B = h / 0.3764                                                   what Stage B learns
"""

import math

import torch

# Stage C latent scaling of the v2 checkpoints ("add 0 1 scaling of data for v2"): z_C = (e + 1) / 42.
# diffusers' prior pipeline undoes it with `latents * latent_mean - latent_std` (42.0 and 1.0).
STAGE_C_LATENT_SCALE = 42.0
STAGE_C_LATENT_SHIFT = 1.0
# Stage A (VQGAN) latent scale: the Stage B diffusion space is encoder output / 0.3764.
STAGE_A_SCALE_FACTOR = 0.3764
# Image side / Stage C latent side (32 / 0.75): 1024 px -> 24; diffusers' `resolution_multiple`.
RESOLUTION_MULTIPLE = 42.67
# Stage B latent side / Stage C latent side: 24 -> 256; diffusers' `latent_dim_scale`.
LATENT_DIM_SCALE = 10.67
# The semantic compressor sees the image at this fraction of the Stage A resolution (1024 -> 768 -> 24).
SEMANTIC_IMAGE_SCALE = 0.75
# Image sizes go in steps of this many pixels (1024, 1152, ...).
IMAGE_SIZE_STEP = 128


def semantic_to_stage_c(e: torch.Tensor) -> torch.Tensor:
    """Semantic compressor output e -> the Stage C diffusion space z_C = (e + 1) / 42."""
    return (e + STAGE_C_LATENT_SHIFT) / STAGE_C_LATENT_SCALE


def stage_c_to_semantic(z_c: torch.Tensor) -> torch.Tensor:
    """Stage C diffusion space -> e = 42 z_C - 1, the condition Stage B takes."""
    return z_c * STAGE_C_LATENT_SCALE - STAGE_C_LATENT_SHIFT


def stage_a_to_stage_b(h: torch.Tensor, scale_factor: float = STAGE_A_SCALE_FACTOR) -> torch.Tensor:
    """Stage A encoder output (unquantized) -> the Stage B diffusion space z_B = h / 0.3764."""
    return h / scale_factor


def stage_b_to_stage_a(z_b: torch.Tensor, scale_factor: float = STAGE_A_SCALE_FACTOR) -> torch.Tensor:
    """Stage B diffusion space -> what Stage A decodes (without quantization)."""
    return z_b * scale_factor


def check_image_size(height: int, width: int) -> None:
    for name, side in (("height", height), ("width", width)):
        if side <= 0 or side % IMAGE_SIZE_STEP:
            raise ValueError(f"image {name} must be a positive multiple of {IMAGE_SIZE_STEP} px, got {side}")


def stage_c_latent_size(height: int, width: int, resolution_multiple: float = RESOLUTION_MULTIPLE) -> tuple[int, int]:
    """The Stage C latent grid for an image size: ceil(side / 42.67) (1024 -> 24, 1152 -> 27, 128 -> 3)."""
    return math.ceil(height / resolution_multiple), math.ceil(width / resolution_multiple)


def stage_b_latent_size(
    stage_c_height: int, stage_c_width: int, latent_dim_scale: float = LATENT_DIM_SCALE
) -> tuple[int, int]:
    """The Stage B latent grid for a Stage C grid: int(side * 10.67) (24 -> 256, 27 -> 288, 3 -> 32)."""
    return int(stage_c_height * latent_dim_scale), int(stage_c_width * latent_dim_scale)


def semantic_image_size(height: int, width: int) -> tuple[int, int]:
    """The semantic compressor's input size for a training image: 0.75x, on a multiple of 32 (its stride)."""
    return (
        max(32, round(height * SEMANTIC_IMAGE_SCALE / 32) * 32),
        max(32, round(width * SEMANTIC_IMAGE_SCALE / 32) * 32),
    )
