"""The diffusion math against the spec's formulas and against diffusers' DDPMWuerstchenScheduler."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMWuerstchenScheduler
from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import (
    DEFAULT_STAGE_C_TIMESTEPS as DIFFUSERS_STAGE_C_TIMESTEPS,
)

from stages import latents
from stages.diffusion import (
    DEFAULT_STAGE_C_TIMESTEPS,
    add_noise,
    check_timesteps,
    classifier_free_guidance,
    cosine_alpha_cumprod,
    ddpm_step,
    p2_loss_weight,
    sample_t,
    uniform_timesteps,
)


def _alpha_reference(t: float) -> float:
    s = 0.008
    a = math.cos(math.pi / 2 * (t + s) / (1 + s)) ** 2 / math.cos(math.pi / 2 * s / (1 + s)) ** 2
    return min(max(a, 1e-4), 0.9999)


def test_cosine_schedule_matches_the_formula_and_is_clamped():
    t = torch.linspace(0, 1, 101)
    expected = torch.tensor([_alpha_reference(v) for v in t.tolist()])
    torch.testing.assert_close(cosine_alpha_cumprod(t), expected, atol=1e-6, rtol=1e-5)
    assert cosine_alpha_cumprod(torch.tensor([0.0])).item() == pytest.approx(0.9999)
    assert cosine_alpha_cumprod(torch.tensor([1.0])).item() == pytest.approx(1e-4)
    assert torch.all(cosine_alpha_cumprod(t)[1:] <= cosine_alpha_cumprod(t)[:-1])


def test_forward_noising():
    x0, eps, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0.0, 0.5, 1.0])
    a = torch.tensor([_alpha_reference(v) for v in t.tolist()]).view(3, 1, 1, 1)
    torch.testing.assert_close(add_noise(x0, eps, t), a.sqrt() * x0 + (1 - a).sqrt() * eps)
    scheduler = DDPMWuerstchenScheduler()
    torch.testing.assert_close(add_noise(x0, eps, t), scheduler.add_noise(x0, eps, t))


def test_p2_weight_is_one_minus_alpha_bar():
    t = torch.rand(1000)
    torch.testing.assert_close(p2_loss_weight(t), 1 - cosine_alpha_cumprod(t), atol=1e-6, rtol=1e-5)
    # (k + SNR)^-gamma for other k and gamma, from the definition
    a = cosine_alpha_cumprod(t)
    torch.testing.assert_close(p2_loss_weight(t, k=2.0, gamma=0.5), (2.0 + a / (1 - a)) ** -0.5)


def test_original_t_sampling_distribution():
    """t = clamp(1.08 (1 - u) + 0.001, 0.001, 1): P(t = 1) = 0.081 / 1.08 = 7.5%, the rest uniform."""
    t = sample_t(400_000, "original", generator=torch.Generator().manual_seed(0))
    at_one = (t == 1.0).float().mean().item()
    assert at_one == pytest.approx(0.081 / 1.08, abs=0.002)
    assert t.min().item() >= 0.001 and t.max().item() == 1.0
    below = t[t < 1.0]
    # uniform density 1/1.08 below 1: a quarter of the range holds 0.25/1.08 of all samples
    assert ((below >= 0.25) & (below < 0.5)).float().sum().item() / t.numel() == pytest.approx(0.25 / 1.08, abs=0.003)
    assert below.min().item() == pytest.approx(0.001, abs=1e-3)


def test_uniform_t_sampling_and_unknown_mode():
    t = sample_t(100_000, "uniform", generator=torch.Generator().manual_seed(1))
    assert 0 <= t.min().item() and t.max().item() < 1 and t.mean().item() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="unknown t sampling mode 'cosine'"):
        sample_t(4, "cosine")


def test_latent_scalings_round_trip():
    e = torch.randn(2, 16, 3, 3)
    torch.testing.assert_close(latents.semantic_to_stage_c(e), (e + 1) / 42)
    torch.testing.assert_close(latents.stage_c_to_semantic(latents.semantic_to_stage_c(e)), e, atol=1e-6, rtol=0)
    h = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(latents.stage_a_to_stage_b(h), h / 0.3764)
    torch.testing.assert_close(latents.stage_b_to_stage_a(latents.stage_a_to_stage_b(h)), h, atol=1e-6, rtol=0)


@pytest.mark.parametrize("side, c_side, b_side", [(1024, 24, 256), (1152, 27, 288), (512, 12, 128), (128, 3, 32), (256, 6, 64)])
def test_latent_sizes_follow_the_resolution_rules(side, c_side, b_side):
    assert latents.stage_c_latent_size(side, side) == (c_side, c_side)
    assert math.ceil(side / latents.RESOLUTION_MULTIPLE) == c_side  # diffusers' rule, on multiples of 128
    assert latents.stage_b_latent_size(c_side, c_side) == (b_side, b_side)
    assert b_side * 4 == side  # Stage A is f4: Stage B's grid decodes back to the requested size


def test_a_bucket_sides_stage_c_grid_is_that_of_its_cached_latents():
    """Off the 128 px steps (aspect-ratio buckets' sides), the prior samples the grid the semantic
    compressor gave the bucket's images in prep, not diffusers' ceil(side / 42.67)."""
    from latent_cache.buckets import SIDE_STRIDE, aspect_buckets, parse

    assert SIDE_STRIDE == latents.IMAGE_SIZE_STEP
    assert latents.stage_c_latent_size(1440, 736) == (34, 17) and math.ceil(736 / 42.67) == 18
    for bucket in aspect_buckets(1024) + aspect_buckets(256):
        height, width = parse(bucket)
        sem_h, sem_w = latents.semantic_image_size(height, width)
        assert latents.stage_c_latent_size(height, width) == (sem_h // 32, sem_w // 32)
    assert latents.stage_c_latent_size(1000, 1000, resolution_multiple=40.0) == (25, 25)  # another pipeline's rule


def test_image_sizes_go_in_32_px_steps():
    latents.check_image_size(1024, 1536)
    latents.check_image_size(736, 1440)
    with pytest.raises(ValueError, match="width must be a positive multiple of 32 px, got 1000"):
        latents.check_image_size(1024, 1000)


def test_default_stage_c_timesteps_equal_diffusers():
    assert DEFAULT_STAGE_C_TIMESTEPS == [float(t) for t in DIFFUSERS_STAGE_C_TIMESTEPS]
    assert len(DEFAULT_STAGE_C_TIMESTEPS) == 30 and DEFAULT_STAGE_C_TIMESTEPS[-1] == 0.0
    assert np.allclose(DEFAULT_STAGE_C_TIMESTEPS[:20], np.linspace(1, 2 / 3, 20))


def test_timestep_grids():
    assert uniform_timesteps(4) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert check_timesteps([1.0, 0.5, 0.0]) == [1.0, 0.5, 0.0]
    for bad in ([1.0], [0.5, 0.7, 0.0], [1.0, 0.5], [1.2, 0.0]):
        with pytest.raises(ValueError):
            check_timesteps(bad)


@pytest.mark.parametrize("grid", ["uniform_12", "stage_c_default"])
def test_sampler_step_equals_diffusers_over_a_full_grid(grid):
    scheduler = DDPMWuerstchenScheduler()
    timesteps = uniform_timesteps(12) if grid == "uniform_12" else DEFAULT_STAGE_C_TIMESTEPS
    scheduler.set_timesteps(timesteps=timesteps)
    theirs_gen, ours_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x_theirs = x_ours = torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(4))
    grid_t = scheduler.timesteps
    for i, (t, t_prev) in enumerate(zip(grid_t[:-1], grid_t[1:])):
        eps = torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(100 + i))
        r = t.expand(2)
        x_theirs = scheduler.step(eps, r, x_theirs, generator=theirs_gen).prev_sample
        noise = torch.randn(eps.shape, generator=ours_gen)
        x_ours = ddpm_step(eps, r, t_prev.expand(2), x_ours, noise)
        torch.testing.assert_close(x_ours, x_theirs, atol=1e-6, rtol=0, msg=f"step {i} at t={t.item()}")


def test_last_step_adds_no_noise():
    eps, x = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    t, zero = torch.tensor([0.25]), torch.tensor([0.0])
    assert torch.equal(ddpm_step(eps, t, zero, x, torch.randn(1, 4, 2, 2)), ddpm_step(eps, t, zero, x, torch.zeros(1, 4, 2, 2)))


def test_classifier_free_guidance():
    cond, uncond = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 4.0), uncond + 4.0 * (cond - uncond))
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 1.0), cond)


def test_the_stage_c_latent_spaces_map_the_cache_s_v2_latents_and_back():
    e = torch.randn(3, 16, 2, 2)
    z_c = latents.semantic_to_stage_c(e)
    v2, cascade = latents.latent_space("v2"), latents.latent_space("stable_cascade")
    assert v2.from_v2(z_c) is z_c and v2.to_v2(z_c) is z_c
    torch.testing.assert_close(cascade.from_v2(z_c), e, atol=1e-5, rtol=0)  # Stable Cascade learns e itself
    torch.testing.assert_close(cascade.to_v2(cascade.from_v2(z_c)), z_c, atol=1e-7, rtol=0)
    torch.testing.assert_close(cascade.to_semantic(e), e)
    assert latents.latent_space_name(42.0, 1.0) == "v2" and latents.latent_space_name(1, 0) == "stable_cascade"
    with pytest.raises(ValueError, match=r"unknown Stage C latent space 'raw'; known: \['stable_cascade', 'v2'\]"):
        latents.latent_space("raw")
    with pytest.raises(ValueError, match="no known Stage C latent space has latent_mean=2.0"):
        latents.latent_space_name(2.0, 0.0)
    with pytest.raises(ValueError, match="positive scale"):
        latents.StageCLatentSpace(0.0, 1.0)
