"""The C -> B -> A sampler against diffusers' pipelines loaded from folders our writer produced."""

import json

import pytest
import torch
from conftest import randomize_
from diffusers import WuerstchenCombinedPipeline, WuerstchenPriorPipeline

from stages import StageA, StageB, StageC
from stages.diffusers_pipeline import load_sampler, write_combined_pipeline, write_prior_pipeline
from stages.sampler import WuerstchenSampler
from stages.text_encoders import ClipTextEncoder


@pytest.fixture(scope="module")
def sampler() -> WuerstchenSampler:
    torch.manual_seed(0)
    stage_a = randomize_(StageA.from_flavor("tiny"), seed=3, std=0.1).eval()
    with torch.no_grad():  # centre the random decoder's output in [0, 1], so that few pixels are clamped
        stage_a.out_block[0].weight.mul_(0.2)
        stage_a.out_block[0].bias.fill_(0.5)
    return WuerstchenSampler(
        randomize_(StageC.from_flavor("tiny"), seed=1, std=0.1).eval(),
        ClipTextEncoder.tiny(width=32, seed=1),
        randomize_(StageB.from_flavor("tiny", clip_embd=24), seed=2, std=0.1).eval(),
        ClipTextEncoder.tiny(width=24, seed=2),  # a different width, as bigG (1280) and ViT-H (1024) differ
        stage_a,
    )


@pytest.fixture(scope="module")
def exported(sampler, tmp_path_factory):
    root = tmp_path_factory.mktemp("combined")
    write_combined_pipeline(
        root, sampler.stage_c, sampler.text_encoder_c, sampler.stage_b, sampler.text_encoder_b, sampler.stage_a
    )
    return root


def test_combined_pipeline_layout(exported):
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "WuerstchenCombinedPipeline"
    expected = {"prior_prior", "prior_text_encoder", "prior_tokenizer", "prior_scheduler", "decoder", "vqgan",
                "text_encoder", "tokenizer", "scheduler"}
    assert expected <= set(index) and expected == {p.name for p in exported.iterdir() if p.is_dir()}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(height=128, width=256, prior_steps=5, decoder_steps=4, prior_guidance=3.0, decoder_guidance=2.0),
        dict(height=256, width=128, prior_guidance=4.0, decoder_steps=3),  # DEFAULT_STAGE_C_TIMESTEPS, no decoder CFG
        dict(height=128, width=128, prior_timesteps=[1.0, 0.7, 0.3, 0.0], decoder_timesteps=[1.0, 0.5, 0.0], prior_guidance=1.0),
    ],
    ids=["cfg-both", "default-prior-grid", "explicit-timesteps-no-cfg"],
)
def test_images_equal_diffusers_combined_pipeline(sampler, exported, kwargs):
    pipe = WuerstchenCombinedPipeline.from_pretrained(exported)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        "a red apple on a wooden table",
        height=kwargs["height"],
        width=kwargs["width"],
        prior_num_inference_steps=kwargs.get("prior_steps") or 60,
        prior_timesteps=kwargs.get("prior_timesteps") or (None if kwargs.get("prior_steps") else _default_prior_grid()),
        prior_guidance_scale=kwargs["prior_guidance"],
        num_inference_steps=kwargs.get("decoder_steps") or 12,
        decoder_timesteps=kwargs.get("decoder_timesteps"),
        decoder_guidance_scale=kwargs.get("decoder_guidance", 0.0),
        generator=torch.Generator().manual_seed(11),
        output_type="pt",
    ).images
    ours = sampler(["a red apple on a wooden table"], generator=11, progress=False, **kwargs)
    assert ours.shape == theirs.shape == (1, 3, kwargs["height"], kwargs["width"])
    inside = ((ours > 0) & (ours < 1)).float().mean().item()
    assert inside > 0.5, f"only {inside:.0%} of the pixels are unclamped: the comparison would be weak"
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def _default_prior_grid():
    from stages.diffusion import DEFAULT_STAGE_C_TIMESTEPS

    return DEFAULT_STAGE_C_TIMESTEPS


def test_prior_latents_equal_diffusers_prior_pipeline(sampler, tmp_path):
    write_prior_pipeline(tmp_path, sampler.stage_c, sampler.text_encoder_c)
    pipe = WuerstchenPriorPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        ["a cat", "a dog"], height=256, width=384, num_inference_steps=6, guidance_scale=5.0,
        negative_prompt=["blurry", "blurry"], generator=torch.Generator().manual_seed(3), output_type="pt",
    ).image_embeddings
    ours = sampler(
        ["a cat", "a dog"], height=256, width=384, prior_steps=6, prior_guidance=5.0, negative_prompts=["blurry"],
        generator=3, output="semantic", progress=False,
    )
    assert ours.shape == (2, 16, 6, 9)
    # e = 42 z - 1 of a random prior is large (~10^2): compare at fp32 rounding relative to that scale.
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_a_prior_of_the_stable_cascade_latent_space_exports_and_loads_with_its_space(sampler, tmp_path):
    """A prior diffusing in e itself (latent_space "stable_cascade"): the prior pipeline's model_index
    carries latent_mean 1 / latent_std 0, so diffusers' WuerstchenPriorPipeline maps its samples back
    as ours does, and load_sampler reads the space back; a combined export records it as
    prior_latent_mean / prior_latent_std, which diffusers' combined pipeline takes once set."""
    cascade = WuerstchenSampler(sampler.stage_c, sampler.text_encoder_c, sampler.stage_b, sampler.text_encoder_b,
                                sampler.stage_a, latent_space="stable_cascade")
    write_prior_pipeline(tmp_path / "prior", cascade.stage_c, cascade.text_encoder_c, cascade.latent_space)
    index = json.loads((tmp_path / "prior" / "model_index.json").read_text())
    assert (index["latent_mean"], index["latent_std"]) == (1.0, 0.0)
    pipe = WuerstchenPriorPipeline.from_pretrained(tmp_path / "prior")
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(["a cat"], height=128, width=128, num_inference_steps=4, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(3), output_type="pt").image_embeddings
    kwargs = dict(height=128, width=128, prior_steps=4, prior_guidance=3.0, generator=3, output="semantic", progress=False)
    ours = cascade(["a cat"], **kwargs)
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()  # fp32 rounding at the samples' scale
    # the same prior's samples in the v2 space differ by e = 42 z - 1
    torch.testing.assert_close(sampler(["a cat"], **kwargs), ours * 42 - 1, atol=1e-4, rtol=1e-5)
    assert load_sampler(tmp_path / "prior").latent_space == "stable_cascade"
    write_combined_pipeline(tmp_path / "combined", cascade.stage_c, cascade.text_encoder_c, cascade.stage_b,
                            cascade.text_encoder_b, cascade.stage_a, cascade.latent_space)
    loaded = load_sampler(tmp_path / "combined")
    assert loaded.latent_space == "stable_cascade"
    combined = WuerstchenCombinedPipeline.from_pretrained(tmp_path / "combined")
    combined.set_progress_bar_config(disable=True)
    combined.prior_pipe.register_to_config(latent_mean=1.0, latent_std=0.0)  # as write_combined_pipeline says
    images = combined(["a cat"], height=128, width=128, prior_num_inference_steps=4, prior_guidance_scale=3.0,
                      num_inference_steps=3, decoder_guidance_scale=0.0, generator=torch.Generator().manual_seed(3),
                      output_type="pt").images
    mine = loaded(["a cat"], height=128, width=128, prior_steps=4, prior_guidance=3.0, decoder_steps=3,
                  generator=3, progress=False)
    torch.testing.assert_close(mine, images.float(), atol=1e-4, rtol=0)


def test_a_sampler_loads_back_from_the_exported_folder(sampler, exported):
    loaded = load_sampler(exported)
    kwargs = dict(height=128, width=128, prior_steps=3, decoder_steps=2, generator=5, progress=False)
    torch.testing.assert_close(loaded(["a boat"], **kwargs), sampler(["a boat"], **kwargs), atol=1e-5, rtol=0)


def test_batches_seeds_and_outputs(sampler):
    kwargs = dict(height=128, width=128, prior_steps=3, decoder_steps=2, progress=False)
    images = sampler(["a boat", "a tree", "a house"], generator=1, **kwargs)
    assert images.shape == (3, 3, 128, 128) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, sampler(["a boat", "a tree", "a house"], generator=1, **kwargs))
    assert not torch.equal(images, sampler(["a boat", "a tree", "a house"], generator=2, **kwargs))
    assert sampler(["a boat"], generator=1, output="stage_b", **kwargs).shape == (1, 4, 32, 32)
    assert sampler(["a boat"], generator=1, output="semantic", **kwargs).shape == (1, 16, 3, 3)


def test_prior_only_sampler_returns_latents_and_refuses_images(sampler):
    prior_only = WuerstchenSampler(sampler.stage_c, sampler.text_encoder_c)
    out = prior_only("a boat", height=128, width=128, prior_steps=2, output="semantic", progress=False)
    assert out.shape == (1, 16, 3, 3)
    with pytest.raises(ValueError, match="needs Stage B"):
        prior_only("a boat", height=128, width=128, prior_steps=2, progress=False)


def test_a_bucket_shape_is_sampled_at_its_cached_grids_and_decodes_to_its_size(sampler):
    """An aspect-ratio bucket's size off diffusers' 128 px steps (96 x 160): the prior samples the
    grid of the bucket's cached latents (semantic compressor: 2 x 4), Stage B that of its Stage A
    latents (24 x 40), and the picture has the size asked."""
    kwargs = dict(height=96, width=160, prior_steps=2, decoder_steps=2, generator=1, progress=False)
    assert sampler(["a cat"], output="semantic", **kwargs).shape == (1, 16, 2, 4)
    assert sampler(["a cat"], output="stage_b", **kwargs).shape == (1, 4, 24, 40)
    assert sampler(["a cat"], **kwargs).shape == (1, 3, 96, 160)


def test_bad_arguments_are_named(sampler):
    with pytest.raises(ValueError, match="multiple of 32 px, got 100"):
        sampler(["x"], height=100, width=128, progress=False)
    with pytest.raises(ValueError, match="either a number of steps or explicit timesteps"):
        sampler(["x"], height=128, width=128, prior_steps=3, prior_timesteps=[1.0, 0.0], progress=False)
    with pytest.raises(ValueError, match="output must be one of"):
        sampler(["x"], height=128, width=128, output="png", progress=False)
    with pytest.raises(ValueError, match="width c_cond=32; its text encoder gives 24"):
        WuerstchenSampler(sampler.stage_c, sampler.text_encoder_b)


def test_one_generator_per_sample_makes_each_sample_independent_of_its_batch_and_equals_diffusers(sampler, tmp_path):
    """A list of generators (diffusers' convention) draws each sample's noise from its own: a prompt's
    sample is the same alone or in any batch (what lets validation split its captions over workers),
    and diffusers' prior pipeline given the same list makes the same latents."""
    prompts, seeds = ["a cat", "a dog", "a boat"], [3, 4, 5]
    kwargs = dict(height=128, width=128, prior_steps=4, prior_guidance=3.0, output="semantic", progress=False)
    batch = sampler(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], **kwargs)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = sampler([prompt], generator=[torch.Generator().manual_seed(seed)], **kwargs)
        assert (batch[i:i + 1] - alone).abs().max() <= 1e-5 * batch.abs().max()  # fp32 rounding at e's scale
    # a single generator draws the batch's noise together, so its samples differ from the list's
    assert (batch - sampler(prompts, generator=3, **kwargs)).abs().max() > 0.1 * batch.abs().max()
    reversed_ = sampler(prompts[::-1], generator=[torch.Generator().manual_seed(s) for s in seeds[::-1]], **kwargs)
    assert (reversed_.flip(0) - batch).abs().max() <= 1e-5 * batch.abs().max()

    write_prior_pipeline(tmp_path, sampler.stage_c, sampler.text_encoder_c)
    pipe = WuerstchenPriorPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompts, height=128, width=128, num_inference_steps=4, guidance_scale=3.0,
                  generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt").image_embeddings
    assert (batch - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    with pytest.raises(ValueError, match="2 generators for a batch of 3 samples"):
        sampler(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds[:2]], **kwargs)
