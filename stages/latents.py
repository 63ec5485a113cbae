"""The latent spaces and how their sizes follow from the image size: one place for each constant.

    image (3, H, W) in [0, 1]
      -> semantic compressor at 0.75 x H  -> e (16, ~H/42.67, ~W/42.67)   Stage B's condition
      -> z_C = (e + 1) / 42                                                 what Stage C learns
      -> Stage A encoder                  -> h (4, H/4, W/4)
      -> z_B = h / 0.3764                                                   what Stage B learns
"""

import dataclasses
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
# Image sizes go in steps of this many pixels: the semantic compressor's stride, the step of the
# aspect-ratio buckets' sides (latent_cache/buckets.py SIDE_STRIDE). diffusers' pipelines take steps of
# 128 (1024, 1152, ...), where the grids below are theirs.
IMAGE_SIZE_STEP = 32
# Stage A's downsampling: image side / Stage B (and Stage A) latent side.
STAGE_A_STRIDE = 4


def semantic_to_stage_c(e: torch.Tensor) -> torch.Tensor:
    """Semantic compressor output e -> the Stage C diffusion space z_C = (e + 1) / 42."""
    return (e + STAGE_C_LATENT_SHIFT) / STAGE_C_LATENT_SCALE


def stage_c_to_semantic(z_c: torch.Tensor) -> torch.Tensor:
    """Stage C diffusion space -> e = 42 z_C - 1, the condition Stage B takes."""
    return z_c * STAGE_C_LATENT_SCALE - STAGE_C_LATENT_SHIFT


@dataclasses.dataclass(frozen=True)
class StageCLatentSpace:
    """Where a prior does its diffusion: z = (e + shift) / scale of the semantic latent e. diffusers'
    prior pipeline maps its samples back with `latents * latent_mean - latent_std`, so a space is
    exported as latent_mean = scale, latent_std = shift.

    The cache holds z_C in the v2 space whatever the prior: a prior trained in another space moves
    the cached latents into it (`from_v2`) and its samples back (`to_v2`, `to_semantic`)."""

    scale: float
    shift: float

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"a Stage C latent space needs a positive scale, got {self.scale}")

    def from_semantic(self, e: torch.Tensor) -> torch.Tensor:
        return (e + self.shift) / self.scale

    def to_semantic(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scale - self.shift

    def from_v2(self, z_c: torch.Tensor) -> torch.Tensor:
        """The cache's z_C = (e + 1) / 42 -> this space (unchanged for the v2 space itself)."""
        return z_c if self == LATENT_SPACES["v2"] else self.from_semantic(stage_c_to_semantic(z_c))

    def to_v2(self, z: torch.Tensor) -> torch.Tensor:
        """A sample of this space -> the cache's z_C, to compare it with cached latents."""
        return z if self == LATENT_SPACES["v2"] else semantic_to_stage_c(self.to_semantic(z))


# The priors' latent spaces, by name:
# - "v2": the Würstchen v2 checkpoints' z_C = (e + 1) / 42, std ~0.024 against unit noise, which acts as
#   a strong shift of the signal-to-noise ratio towards noise (what the public weights expect);
# - "stable_cascade": z = e itself, ~unit variance, as Stable Cascade's Stage C learns the semantic
#   latent; a small prior learns its captions several times faster in it (see the README's demo).
LATENT_SPACES = {
    "v2": StageCLatentSpace(STAGE_C_LATENT_SCALE, STAGE_C_LATENT_SHIFT),
    "stable_cascade": StageCLatentSpace(1.0, 0.0),
}


def latent_space(name: str) -> StageCLatentSpace:
    if name not in LATENT_SPACES:
        raise ValueError(f"unknown Stage C latent space {name!r}; known: {sorted(LATENT_SPACES)}")
    return LATENT_SPACES[name]


def latent_space_name(latent_mean: float, latent_std: float) -> str:
    """The name of the space a diffusers prior pipeline's (latent_mean, latent_std) describe."""
    for name, space in LATENT_SPACES.items():
        if (space.scale, space.shift) == (float(latent_mean), float(latent_std)):
            return name
    raise ValueError(f"no known Stage C latent space has latent_mean={latent_mean}, latent_std={latent_std}; "
                     f"known: { {n: (s.scale, s.shift) for n, s in LATENT_SPACES.items()} }")


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
    """The Stage C latent grid for an image size: the grid the semantic compressor gives an image of
    that size in training (its input 0.75x on a multiple of 32, over 32: 1024 -> 24, 1152 -> 27,
    128 -> 3, and for the buckets' sides 96 -> 2, 736 -> 17), which on multiples of 128 px is
    diffusers' ceil(side / 42.67). A pipeline of another resolution_multiple keeps diffusers' formula."""
    if resolution_multiple != RESOLUTION_MULTIPLE:
        return math.ceil(height / resolution_multiple), math.ceil(width / resolution_multiple)
    sem_h, sem_w = semantic_image_size(height, width)
    return sem_h // 32, sem_w // 32


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
