"""The training objectives, and an honest check that a tiny Stage C learns with them."""

import pytest
import torch
from conftest import randomize_

from stages import StageB, StageC
from stages.diffusion import add_noise, cosine_alpha_cumprod
from stages.latents import semantic_to_stage_c
from stages.objectives import StageBObjective, StageCObjective, drop_captions, stage_b_loss, stage_c_loss
from stages.sampler import WuerstchenSampler
from stages.text_encoders import ClipTextEncoder


class Recorder(torch.nn.Module):
    """Wraps a model and keeps the inputs of its last call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, None

    def forward(self, *inputs):
        self.inputs = inputs
        return self.model(*inputs)


class InputsOnly(torch.nn.Module):
    """Keeps the inputs of its last call and predicts zero noise: for checks of what a loss feeds a
    model that need no model (hundreds of calls, in milliseconds)."""

    def forward(self, *inputs):
        self.inputs = inputs
        return torch.zeros_like(inputs[0])


def test_the_stage_c_loss_diffuses_in_the_objective_s_latent_space():
    """The cache holds z_C = (e + 1) / 42; with latent_space "stable_cascade" the model is trained on e
    itself: the same loss as a v2 objective given e, and the validation loss likewise."""
    from stages.objectives import stage_c_validation_loss

    model = randomize_(StageC.from_flavor("tiny"), seed=1, std=0.05).eval()
    e, text = torch.randn(4, 16, 3, 3), torch.randn(4, 77, 32)
    t, noise = torch.tensor([0.1, 0.4, 0.8, 1.0]), torch.randn(4, 16, 3, 3)
    cascade = StageCObjective(latent_space="stable_cascade")
    torch.testing.assert_close(stage_c_loss(model, (e + 1) / 42, text, objective=cascade, t=t, noise=noise),
                               stage_c_loss(model, e, text, t=t, noise=noise))
    keys = ["a", "b", "c", "d"]
    torch.testing.assert_close(stage_c_validation_loss(model, [(keys, (e + 1) / 42, text)], (0.3, 0.7), 0, space="stable_cascade"),
                               stage_c_validation_loss(model, [(keys, e, text)], (0.3, 0.7), 0), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown Stage C latent space 'e'"):
        StageCObjective(latent_space="e")


def test_stage_c_loss_is_the_p2_weighted_noise_mse():
    model = Recorder(randomize_(StageC.from_flavor("tiny"), seed=1, std=0.05).eval())
    z_c, text = (torch.randn(4, 16, 3, 3) + 1) / 42, torch.randn(4, 77, 32)
    t, noise = torch.tensor([0.1, 0.4, 0.8, 1.0]), torch.randn(4, 16, 3, 3)
    loss = stage_c_loss(model, z_c, text, t=t, noise=noise)
    x_t, r, c = model.inputs
    torch.testing.assert_close(x_t, add_noise(z_c, noise, t))
    assert torch.equal(r, t) and torch.equal(c, text)  # no caption dropout when t and noise are fixed
    with torch.no_grad():
        eps = model.model(x_t, t, text)
    expected = ((eps - noise) ** 2).mean(dim=(1, 2, 3)) * (1 - cosine_alpha_cumprod(t))
    torch.testing.assert_close(loss, expected.mean())
    unweighted = stage_c_loss(model, z_c, text, objective=StageCObjective(p2_weighting=False), t=t, noise=noise)
    torch.testing.assert_close(unweighted, ((eps - noise) ** 2).mean())


def test_batch_level_caption_dropout_drops_all_or_nothing():
    text, empty = torch.randn(8, 77, 4), torch.zeros(1, 77, 4)
    gen = torch.Generator().manual_seed(0)
    outcomes = []
    for _ in range(2000):
        dropped = (drop_captions(text, empty, 0.05, "batch", gen) == 0).all(dim=(1, 2))
        assert dropped.all() or not dropped.any()
        outcomes.append(dropped.all().item())
    assert sum(outcomes) / len(outcomes) == pytest.approx(0.05, abs=0.015)


def test_per_sample_caption_dropout():
    text, empty = torch.randn(20_000, 1, 2), torch.zeros(1, 1, 2)
    dropped = (drop_captions(text, empty, 0.3, "sample", torch.Generator().manual_seed(1)) == 0).all(dim=(1, 2))
    assert dropped.float().mean().item() == pytest.approx(0.3, abs=0.015)
    assert drop_captions(text, empty, 0.0, "sample") is text


def test_caption_dropout_replaces_with_the_encoded_empty_prompt():
    model = Recorder(StageC.from_flavor("tiny"))
    text, empty = torch.randn(3, 77, 32), torch.randn(1, 77, 32)
    stage_c_loss(model, torch.randn(3, 16, 2, 2), text, empty, StageCObjective(caption_dropout=1.0))
    assert torch.equal(model.inputs[2], empty.expand(3, 77, 32))
    with pytest.raises(ValueError, match="needs the encoded empty prompt"):
        stage_c_loss(model, torch.randn(3, 16, 2, 2), text, None, StageCObjective(caption_dropout=0.5))


def test_objective_settings_are_validated():
    with pytest.raises(ValueError, match="caption_dropout must be a probability"):
        StageCObjective(caption_dropout=1.5)
    with pytest.raises(ValueError, match="caption_dropout_mode must be 'batch' or 'sample'"):
        StageCObjective(caption_dropout_mode="token")
    with pytest.raises(ValueError, match="unknown t sampling mode"):
        StageBObjective(t_sampling="log")


def test_stage_b_loss_uses_scaled_stage_a_latents_and_drops_the_semantic_condition():
    model = Recorder(StageB.from_flavor("tiny"))
    h, e, text = torch.randn(4, 4, 8, 8), torch.randn(4, 16, 2, 2), torch.randn(4, 77, 32)
    t, noise = torch.full((4,), 0.5), torch.randn(4, 4, 8, 8)
    stage_b_loss(model, h, e, text, t=t, noise=noise)
    torch.testing.assert_close(model.inputs[0], add_noise(h / 0.3764, noise, t))
    assert torch.equal(model.inputs[2], e)
    stage_b_loss(model, h, e, text, StageBObjective(effnet_dropout=1.0))
    assert torch.count_nonzero(model.inputs[2]) == 0
    gen, inputs_only = torch.Generator().manual_seed(2), InputsOnly()
    zeroed = 0
    for _ in range(300):
        stage_b_loss(inputs_only, h, e, text, StageBObjective(effnet_dropout=0.25), generator=gen)
        zeroed += (inputs_only.inputs[2].abs().sum(dim=(1, 2, 3)) == 0).sum().item()
    assert zeroed / 1200 == pytest.approx(0.25, abs=0.04)


def test_untrained_stage_c_predicts_the_input_as_noise():
    """The original init zeroes the output conv: eps = x at the start, a sane starting loss."""
    model = StageC.from_flavor("tiny")
    x = torch.randn(2, 16, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.rand(2), torch.randn(2, 5, 32)), x / (1 + 1e-5))


def test_a_tiny_stage_c_learns_and_guidance_steers_towards_the_conditioned_targets(record_property):
    """Four captions, each with its own fixed semantic latent. After training with the Stage C objective
    (p2 weight, original t sampling, caption dropout), the loss is far below its start, and samples
    guided by a caption land nearest to that caption's latent, which unconditioned samples do not."""
    torch.manual_seed(0)
    encoder = ClipTextEncoder.tiny(width=32, seed=0)
    prompts = ["a red apple", "a blue car", "a green tree", "a yellow sun"]
    text, empty = encoder.encode(prompts), encoder.encode([""])
    targets = torch.randn(4, 16, 3, 3, generator=torch.Generator().manual_seed(0)) * 1.5  # semantic latents e
    model = StageC.from_flavor("tiny", c=64, nhead=4, dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    objective = StageCObjective(caption_dropout=0.2, caption_dropout_mode="sample")
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(500):
        idx = torch.randint(0, 4, (32,), generator=gen)
        loss = stage_c_loss(model, semantic_to_stage_c(targets[idx]), text[idx], empty, objective, generator=gen)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    start, end = sum(losses[:20]) / 20, sum(losses[-50:]) / 50
    record_property("loss_start", start)
    record_property("loss_end", end)
    assert end < start / 5

    sampler = WuerstchenSampler(model.eval(), encoder)

    def nearest_target_accuracy(prompt_of_k, guidance):
        hits = 0.0
        for k in range(4):
            out = sampler([prompt_of_k(k)] * 8, height=128, width=128, prior_steps=20, prior_guidance=guidance,
                          generator=k, output="semantic", progress=False)
            distances = torch.stack([(out - targets[j]).pow(2).mean(dim=(1, 2, 3)) for j in range(4)])
            hits += (distances.argmin(0) == k).float().mean().item() / 4
        return hits

    guided = nearest_target_accuracy(lambda k: prompts[k], 4.0)
    unconditioned = nearest_target_accuracy(lambda k: "", 1.0)
    record_property("nearest_target_accuracy_guided", guided)
    record_property("nearest_target_accuracy_unconditioned", unconditioned)
    assert guided >= 0.9 and unconditioned <= 0.5 and guided > unconditioned + 0.4
