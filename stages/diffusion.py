"""Würstchen's continuous-time diffusion ("Diffuzz"; diffusers' DDPMWuerstchenScheduler).

t in [0, 1] is the noise level, 1 = pure noise; the networks take r = t directly.
"""

from collections.abc import Sequence

import numpy as np
import torch

# Offset of the cosine schedule (Nichol & Dhariwal), as in every shipped scheduler_config.json.
COSINE_S = 0.008
# alpha_cumprod is clamped into this range, so that neither end is exactly 0 or 1.
ALPHA_CUMPROD_MIN, ALPHA_CUMPROD_MAX = 1e-4, 0.9999
# The original training recipe samples t = clamp(1.08 (1 - u) + 0.001, 0.001, 1): about 7.5% land at t = 1.
T_SAMPLING_STRETCH, T_MIN = 1.08, 0.001
# The prior pipeline's default grid: 20 steps from 1 to 2/3, then 10 more to 0 (30 points, 29 model calls).
# Built with numpy's linspace, as diffusers builds it, so that the values agree to the last bit.
DEFAULT_STAGE_C_TIMESTEPS = [float(t) for t in np.linspace(1.0, 2 / 3, 20)] + [
    float(t) for t in np.linspace(2 / 3, 0.0, 11)[1:]
]


def cosine_alpha_cumprod(t: torch.Tensor, s: float = COSINE_S, scaler: float = 1.0) -> torch.Tensor:
    """alpha_bar(t) = cos^2(pi/2 (t + s) / (1 + s)) / cos^2(pi/2 s / (1 + s)), clamped to [1e-4, 0.9999].

    `scaler` warps t as the scheduler's option does (1.0 in every shipped config).
    """
    if scaler > 1:
        t = 1 - (1 - t) ** scaler
    elif scaler < 1:
        t = t**scaler
    s_t = torch.tensor([s], device=t.device)
    init = torch.cos(s_t / (1 + s_t) * torch.pi * 0.5) ** 2
    alpha = torch.cos((t + s_t) / (1 + s_t) * torch.pi * 0.5) ** 2 / init
    return alpha.clamp(ALPHA_CUMPROD_MIN, ALPHA_CUMPROD_MAX)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(values.shape[0], *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The forward process x_t = sqrt(alpha_bar(t)) x0 + sqrt(1 - alpha_bar(t)) eps, per sample."""
    a = _per_sample(cosine_alpha_cumprod(t), x0)
    return (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(x0.dtype)


def p2_loss_weight(t: torch.Tensor, k: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """(k + SNR)^-gamma with SNR = a / (1 - a); for k = gamma = 1 this is exactly 1 - alpha_bar(t)."""
    a = cosine_alpha_cumprod(t)
    return (k + a / (1 - a)) ** -gamma


def sample_t(
    batch_size: int, mode: str = "original", generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Training noise levels: "original" (the Würstchen recipe, over-sampling t = 1) or "uniform" in [0, 1)."""
    u = torch.rand(batch_size, generator=generator, device=device)
    if mode == "original":
        return (T_SAMPLING_STRETCH * (1 - u) + T_MIN).clamp(T_MIN, 1.0)
    if mode == "uniform":
        return u
    raise ValueError(f"unknown t sampling mode {mode!r}; use 'original' or 'uniform'")


def uniform_timesteps(steps: int) -> list[float]:
    """linspace(1, 0, steps + 1): `steps` model calls, the last one landing on 0."""
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be at least 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1).tolist()


def check_timesteps(timesteps: Sequence[float]) -> list[float]:
    grid = [float(t) for t in timesteps]
    if len(grid) < 2 or any(not 0.0 <= t <= 1.0 for t in grid) or any(a <= b for a, b in zip(grid, grid[1:])):
        raise ValueError(f"timesteps must be at least two strictly decreasing values in [0, 1], got {grid}")
    if grid[-1] != 0.0:
        raise ValueError(f"timesteps must end at 0 (the clean sample), got {grid[-1]}")
    return grid


def ddpm_step(
    eps: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, x: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """One DDPM-Würstchen step from noise level t to t_prev < t (per sample), given the predicted noise.

    alpha = a(t) / a(t_prev);  mu = (x - (1 - alpha) eps / sqrt(1 - a(t))) / sqrt(alpha);
    sigma = sqrt((1 - alpha)(1 - a(t_prev)) / (1 - a(t)));  x_prev = mu + sigma z, with no noise where t_prev = 0.
    """
    a_t = _per_sample(cosine_alpha_cumprod(t), x)
    a_prev = _per_sample(cosine_alpha_cumprod(t_prev), x)
    alpha = a_t / a_prev
    mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * eps / (1 - a_t).sqrt())
    sigma = ((1 - alpha) * (1.0 - a_prev) / (1.0 - a_t)).sqrt()
    not_last = _per_sample((t_prev != 0).float(), x)
    return (mu + sigma * noise * not_last).to(eps.dtype)


def classifier_free_guidance(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """eps_uncond + w (eps_cond - eps_uncond); used when w > 1."""
    return torch.lerp(eps_uncond, eps_cond, scale)


def uses_guidance(scale: float) -> bool:
    return scale > 1.0

