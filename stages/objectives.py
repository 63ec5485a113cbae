"""The training objectives of Stage C and Stage B: noise-prediction MSE on cached latents, and their
validation losses (the same MSE on a fixed grid of t with fixed noise); and Stage A's, the VQGAN's
reconstruction loss with its codebook and commitment terms.

Each takes the model and a batch of cached tensors and returns the scalar loss. Pass `t` and `noise`
to evaluate deterministically (validation on a fixed grid of t with fixed noise): conditioning
dropout is then off.
"""

import dataclasses
import zlib
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stages.diffusion import add_noise, p2_loss_weight, sample_t
from stages.latents import STAGE_A_SCALE_FACTOR, latent_space, stage_a_to_stage_b


@dataclasses.dataclass(frozen=True)
class StageCObjective:
    # Caption dropout to the encoded empty prompt, for classifier-free guidance. The original drops
    # the whole batch's captions with p = 0.05 ("batch"); StableCascade drops each sample ("sample").
    caption_dropout: float = 0.05
    caption_dropout_mode: str = "batch"
    t_sampling: str = "original"  # or "uniform"
    p2_weighting: bool = True
    # Where the prior diffuses (stages.latents.LATENT_SPACES): "v2", the public checkpoints' (e + 1) / 42,
    # or "stable_cascade", e itself. The cache holds v2 latents; the loss moves them into this space.
    latent_space: str = "v2"

    def __post_init__(self):
        _check_probability("caption_dropout", self.caption_dropout)
        latent_space(self.latent_space)  # validates the name
        if self.caption_dropout_mode not in ("batch", "sample"):
            raise ValueError(f"caption_dropout_mode must be 'batch' or 'sample', got {self.caption_dropout_mode!r}")
        sample_t(1, self.t_sampling)  # validates the mode


@dataclasses.dataclass(frozen=True)
class StageBObjective:
    # Semantic-condition dropout to zeros (the decoder pipeline's unconditional input is zeros).
    effnet_dropout: float = 0.1
    t_sampling: str = "original"
    p2_weighting: bool = True
    scale_factor: float = STAGE_A_SCALE_FACTOR

    def __post_init__(self):
        _check_probability("effnet_dropout", self.effnet_dropout)
        sample_t(1, self.t_sampling)


RECONSTRUCTION_LOSSES = ("mse", "l1")


@dataclasses.dataclass(frozen=True)
class StageAObjective:
    """Stage A (the Paella VQGAN): pixel reconstruction + vq_weight x (codebook + 0.25 commitment).
    Not included: the perceptual (LPIPS) and adversarial (patch discriminator) terms of VQGAN
    recipes, which sharpen textures at the cost of PSNR; a pixel loss alone gives the blurrier,
    higher-PSNR autoencoder."""

    reconstruction: str = "mse"  # or "l1"
    vq_weight: float = 1.0
    # Decode the quantized latents, with a straight-through gradient (the VQGAN recipe). False: a
    # plain autoencoder, no codebook trained (Würstchen v2 decodes Stage B's unquantized latents).
    quantize: bool = True
    # Train on a random square crop of this side of each image (None: the whole image). Stage A is
    # convolutional: crops teach it the same, at a fraction of the cost per image (VQGANs are trained
    # on 256 px crops). Validation always reconstructs whole images.
    crop: int | None = None

    def __post_init__(self):
        if self.crop is not None and (self.crop <= 0 or self.crop % 4):
            raise ValueError(f"crop must be a positive multiple of 4 (Stage A's downsampling), got {self.crop}")
        if self.reconstruction not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTION_LOSSES}, got {self.reconstruction!r}")
        if self.vq_weight < 0:
            raise ValueError(f"vq_weight must be >= 0, got {self.vq_weight}")


def random_crops(images: torch.Tensor, side: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A square of `side` from each image (B, C, H, W), at a position drawn from `generator`."""
    b, _, h, w = images.shape
    if side > min(h, w):
        raise ValueError(f"crop {side} is larger than the images ({h}x{w})")
    ys = torch.randint(0, h - side + 1, (b,), generator=generator, device=_draw_device(generator)).tolist()
    xs = torch.randint(0, w - side + 1, (b,), generator=generator, device=_draw_device(generator)).tolist()
    return torch.stack([image[:, y : y + side, x : x + side] for image, y, x in zip(images, ys, xs)])


def stage_a_loss(model: nn.Module, images: torch.Tensor, objective: StageAObjective = StageAObjective(),
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Stage A: reconstruct images (B, 3, H, W) in [0, 1] (random crops of objective.crop, drawn from
    `generator`); the model's forward returns (reconstruction, quantizer loss)."""
    if objective.crop is not None:
        images = random_crops(images, objective.crop, generator)
    reconstruction, vq_loss = model(images, quantize=objective.quantize)
    error = F.mse_loss if objective.reconstruction == "mse" else F.l1_loss
    return error(reconstruction.float(), images.float()) + objective.vq_weight * vq_loss.float()


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


def _draw_device(generator: torch.Generator | None) -> torch.device:
    """Where a step's random draws are made: on the generator's device (a CUDA generator draws on the
    GPU, with no copy from the host), else on the CPU (the same numbers on every machine)."""
    return generator.device if generator is not None else torch.device("cpu")


def _noise_and_t(x0: torch.Tensor, mode: str, t, noise, generator) -> tuple[torch.Tensor, torch.Tensor]:
    if t is None:
        t = sample_t(x0.shape[0], mode, generator=generator, device=_draw_device(generator))
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=_draw_device(generator), dtype=x0.dtype)
    return t.to(x0.device), noise.to(x0.device, x0.dtype)


def weighted_mse(eps_pred: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, p2_weighting: bool) -> torch.Tensor:
    """Per-sample MSE over (C, H, W), times the p2 weight 1 - alpha_bar(t), averaged over the batch."""
    per_sample = (eps_pred.float() - noise.float()).pow(2).mean(dim=tuple(range(1, noise.ndim)))
    if p2_weighting:
        per_sample = per_sample * p2_loss_weight(t).to(per_sample.device)
    return per_sample.mean()


def drop_captions(
    text: torch.Tensor, empty_text: torch.Tensor, rate: float, mode: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replaces captions by the encoded empty prompt: all of them with probability `rate` ("batch"),
    or each one with probability `rate` ("sample")."""
    if rate <= 0.0:
        return text
    b, device = text.shape[0], _draw_device(generator)
    if mode == "batch":
        drop = (torch.rand(1, generator=generator, device=device) < rate).expand(b)
    else:
        drop = torch.rand(b, generator=generator, device=device) < rate
    drop = drop.to(text.device).view(b, *([1] * (text.ndim - 1)))
    return torch.where(drop, empty_text.to(text.dtype).expand_as(text), text)


def stage_c_loss(
    model: nn.Module,
    z_c: torch.Tensor,
    text: torch.Tensor,
    empty_text: torch.Tensor | None = None,
    objective: StageCObjective = StageCObjective(),
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stage C: predict the noise on z_C given the text tokens, in the objective's latent space.

    z_c: (B, 16, h, w) as the cache holds it ((e + 1) / 42, the v2 space); text: (B, 77, c_cond); empty_text: the encoded "" prompt (1, 77, c_cond),
    needed when captions are dropped.
    """
    deterministic = t is not None or noise is not None
    z_c = latent_space(objective.latent_space).from_v2(z_c.float())
    t, noise = _noise_and_t(z_c, objective.t_sampling, t, noise, generator)
    if not deterministic and objective.caption_dropout > 0:
        if empty_text is None:
            raise ValueError("caption dropout needs the encoded empty prompt (empty_text)")
        text = drop_captions(text, empty_text, objective.caption_dropout, objective.caption_dropout_mode, generator)
    eps = model(add_noise(z_c, noise, t), t, text)
    return weighted_mse(eps, noise, t, objective.p2_weighting)


def fixed_noise(keys: Sequence[str], shape, seed: int, t_index: int) -> torch.Tensor:
    """Noise fixed per (row key, t): the same numbers whatever the batching or the number of workers."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(f"{seed}:{t_index}:{k}".encode())))
            for k in keys]
    return torch.stack(rows)


@torch.no_grad()
def _fixed_grid_loss(model: nn.Module, batches: Iterable[tuple], t_grid: Sequence[float], seed: int, p2_weighting: bool,
                     predict) -> float:
    """The noise MSE (p2-weighted) of every row at each t of `t_grid`, with `fixed_noise`, averaged over
    rows and t. `batches`: (keys, x0, *conditions) on the model's device; `predict(model, x_t, t,
    *conditions)` is the model's noise prediction. Eval mode, and the model given back in its mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for keys, x0, *conditions in batches:
        x0 = x0.float()
        for i, t_value in enumerate(t_grid):
            t = torch.full((x0.shape[0],), float(t_value), device=x0.device)
            noise = fixed_noise(keys, x0.shape[1:], seed, i).to(x0.device)
            eps = predict(model, add_noise(x0, noise, t), t, *conditions)
            total += float(weighted_mse(eps, noise, t, p2_weighting)) * x0.shape[0]
            count += x0.shape[0]
    model.train(was_training)
    return total / max(count, 1)


def stage_c_validation_loss(
    model: nn.Module,
    batches: Iterable[tuple[Sequence[str], torch.Tensor, torch.Tensor]],
    t_grid: Sequence[float],
    seed: int,
    p2_weighting: bool = True,
    space: str = "v2",
) -> float:
    """Stage C's validation loss: the noise MSE (p2-weighted) of every row at each t of `t_grid`, with
    `fixed_noise`, averaged over rows and t: deterministic, so two checkpoints are comparable, and
    independent of how the rows are batched. `batches`: (keys, z_c, text) on the model's device, z_c
    as the cache holds it, diffused in the latent space `space` (only losses of one space compare)."""
    to_space = latent_space(space).from_v2
    moved = ((keys, to_space(z_c.float()), *rest) for keys, z_c, *rest in batches)
    return _fixed_grid_loss(model, moved, t_grid, seed, p2_weighting, lambda m, x, t, text: m(x, t, text))


def stage_b_validation_loss(
    model: nn.Module,
    batches: Iterable[tuple[Sequence[str], torch.Tensor, torch.Tensor, torch.Tensor]],
    t_grid: Sequence[float],
    seed: int,
    objective: "StageBObjective" = StageBObjective(),
) -> float:
    """Stage B's validation loss, as Stage C's: `batches` of (keys, Stage A latents h, semantic e,
    decoder text) on the model's device; the noise is on z_B = h / scale_factor. For a
    StageBWithCompressor, the compressor's input images take e's place."""
    scaled = ((keys, stage_a_to_stage_b(h.float(), objective.scale_factor), e, text) for keys, h, e, text in batches)
    return _fixed_grid_loss(model, scaled, t_grid, seed, objective.p2_weighting,
                            lambda m, x, t, e, text: m(x, t, e.float(), text))


def stage_b_loss(
    model: nn.Module,
    stage_a_latents: torch.Tensor,
    semantic: torch.Tensor,
    text: torch.Tensor,
    objective: StageBObjective = StageBObjective(),
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    compress: bool = False,
) -> torch.Tensor:
    """Stage B: predict the noise on z_B = h / 0.3764 given e and the text tokens.

    stage_a_latents: Stage A's encoder output h (B, 4, H, W), unquantized; semantic: e (B, 16, h, w);
    text: (B, 77, clip_embd). With compress=True, `semantic` is the semantic compressor's input
    images instead and `model` a StageBWithCompressor, which makes e of them (the compressor trained
    with Stage B); the condition dropout then zeroes e inside it.
    """
    deterministic = t is not None or noise is not None
    z_b = stage_a_to_stage_b(stage_a_latents.float(), objective.scale_factor)
    t, noise = _noise_and_t(z_b, objective.t_sampling, t, noise, generator)
    semantic = semantic.float()
    keep = None
    if not deterministic and objective.effnet_dropout > 0:
        keep = torch.rand(semantic.shape[0], generator=generator, device=_draw_device(generator)) >= objective.effnet_dropout
        keep = keep.to(semantic.device, semantic.dtype)
    if compress:
        eps = model(add_noise(z_b, noise, t), t, semantic, text, keep=keep)
    else:
        semantic = semantic * keep.view(-1, 1, 1, 1) if keep is not None else semantic
        eps = model(add_noise(z_b, noise, t), t, semantic, text)
    return weighted_mse(eps, noise, t, objective.p2_weighting)
