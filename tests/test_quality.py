"""pipelines.quality (the figures the trained models are judged by: the decoders' reconstructions, the
prior's caption -> latent retrieval and latent Fréchet distance) and pipelines.decoder_bundle (a
decoder bundle as a folder), on tiny models."""

import json
import math

import pytest
import torch

from latent_cache.encoders import build_decoder_text_encoder, model_fingerprint, text_fingerprint
from latent_cache.spec import EncoderWeights
from pipelines import decoder_bundle
from pipelines.quality import (Averages, caption_retrieval, condition_problems, decoder_reconstruction, image_scores,
                               latent_frechet_distance, own_latent_ranks, own_retrieval, rank_figures,
                               stage_a_reconstruction, thumbnail_regression, thumbnails)
from stages import StageA, StageB, StageC
from stages.text_encoders import ClipTextEncoder
from stages.sampler import WuerstchenSampler


def test_image_scores_are_per_image_psnr_and_ssim():
    torch.manual_seed(0)
    original = torch.rand(3, 3, 32, 32) * 0.8 + 0.1
    noisy = original + 0.05 * torch.randn_like(original)
    scores = image_scores(torch.stack([original[0], noisy[1], original[2] + 0.1]), original)
    assert scores["psnr"].shape == scores["ssim"].shape == (3,)
    mse = (noisy[1].clamp(0, 1) - original[1]).square().mean()
    assert scores["psnr"][1] == pytest.approx(float(10 * torch.log10(1 / mse)), rel=1e-4)
    assert scores["psnr"][2] == pytest.approx(20.0, abs=1e-3)  # a uniform error of 0.1: 10 log10(1 / 0.01)
    assert scores["ssim"][0] == pytest.approx(1.0, abs=1e-5) and scores["ssim"][1] < 0.99
    with pytest.raises(ValueError, match="shape"):
        image_scores(original[:2], original)


def test_averages_weigh_batches_by_their_images():
    averages = Averages()
    averages.add({"psnr": torch.tensor([10.0, 20.0, 30.0])}, 3)
    averages.add({"psnr": torch.tensor([40.0])}, 1)
    assert averages.means() == {"psnr": 25.0}


def _tiny_bundle(seed: int = 0):
    torch.manual_seed(seed)
    stage_b, stage_a = StageB.from_flavor("tiny").eval(), StageA.from_flavor("tiny").eval()
    text = build_decoder_text_encoder("tiny", EncoderWeights(None, 1), stage_b.config.clip_embd)
    return stage_b, stage_a, text


def test_stage_a_reconstruction_gives_the_model_back_in_its_mode():
    stage_a = StageA.from_flavor("tiny").train()
    scores = stage_a_reconstruction(stage_a, [torch.rand(2, 3, 32, 32)], quantize=True)
    assert set(scores) == {"loss", "psnr", "ssim"} and stage_a.training
    assert math.isfinite(scores["psnr"]) and 0 < scores["loss"] < 1


def test_decoder_reconstruction_regenerates_each_image_from_its_semantic_latent_seeded():
    stage_b, stage_a, text = _tiny_bundle()
    sampler = WuerstchenSampler(None, None, stage_b, text, stage_a)
    images = torch.rand(3, 3, 64, 64)
    z_c = torch.randn(3, 16, 3, 3)  # -> 3 x 10.67 = 32 -> Stage A at 128 px, compared at 64 px
    first = decoder_reconstruction(sampler, images, z_c, ["a cat", "a dog", "a hat"], steps=2, seed=3, batch_size=2)
    again = decoder_reconstruction(sampler, images, z_c, ["a cat", "a dog", "a hat"], steps=2, seed=3, batch_size=2)
    assert first["images"].shape == images.shape and torch.equal(first["images"], again["images"])
    assert set(first) == {"psnr", "ssim", "images"} and math.isfinite(first["psnr"])
    with pytest.raises(ValueError, match="Stage B"):
        decoder_reconstruction(WuerstchenSampler(None, None), images, z_c, ["a"] * 3)


def _write_bundle(folder, stage_b, stage_a, text, **changes):
    stage_b.save_pretrained(folder / "decoder")
    stage_a.save_pretrained(folder / "vqgan")
    meta = {
        "flavor": "tiny", "decoder_text_encoder": {"path": None, "seed": 1},
        "fingerprints": {
            "stage_a": model_fingerprint("stage_a", stage_a, EncoderWeights(None))["fingerprint"],
            "decoder_text_encoder": text_fingerprint(text, EncoderWeights(None, 1))["fingerprint"],
            "semantic_compressor": "abc",
        },
        **changes,
    }
    decoder_bundle.write_meta(folder, meta)
    return meta


def test_a_bundle_folder_loads_checked_against_the_fingerprints_its_stage_b_was_trained_with(tmp_path):
    stage_b, stage_a, text = _tiny_bundle()
    meta = _write_bundle(tmp_path, stage_b, stage_a, text)
    loaded_b, loaded_a, loaded_text, loaded_meta = decoder_bundle.load(tmp_path)
    assert loaded_meta == meta and json.loads((tmp_path / decoder_bundle.BUNDLE_FILE).read_text()) == meta
    assert all(torch.equal(a, b) for a, b in zip(stage_a.state_dict().values(), loaded_a.state_dict().values()))
    assert torch.equal(loaded_text.encode(["a cat"]), text.encode(["a cat"]))

    StageA.from_flavor("tiny").save_pretrained(tmp_path / "vqgan")  # another Stage A than Stage B learned
    with pytest.raises(ValueError, match="stage_a has fingerprint"):
        decoder_bundle.load(tmp_path)
    assert decoder_bundle.read_meta(tmp_path / "vqgan") is None
    with pytest.raises(FileNotFoundError, match="bundle.json"):
        decoder_bundle.load(tmp_path / "vqgan")



def test_a_bundle_folder_carries_the_semantic_compressor_trained_with_its_stage_b(tmp_path):
    """A bundle whose compressor was trained with its Stage B holds it in semantic_compressor/, checked
    against the fingerprint bundle.json records (what pins a prior to the bundle); a bundle without
    one gives None."""
    from latent_cache.encoders import model_fingerprint as fingerprint_of
    from stages import SemanticCompressor

    stage_b, stage_a, text = _tiny_bundle()
    _write_bundle(tmp_path, stage_b, stage_a, text)
    assert decoder_bundle.load_semantic_compressor(tmp_path) is None
    compressor = SemanticCompressor.from_flavor("tiny")
    compressor.save_pretrained(tmp_path / "semantic_compressor")
    with pytest.raises(ValueError, match="its semantic compressor has fingerprint .* trained with abc"):
        decoder_bundle.load_semantic_compressor(tmp_path)
    meta = decoder_bundle.read_meta(tmp_path)
    meta["fingerprints"]["semantic_compressor"] = fingerprint_of("semantic_compressor", compressor, EncoderWeights())["fingerprint"]
    decoder_bundle.write_meta(tmp_path, meta)
    loaded = decoder_bundle.load_semantic_compressor(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), compressor.state_dict().values()))

def test_own_retrieval_counts_the_regenerated_images_nearest_their_own_original():
    torch.manual_seed(0)
    originals = torch.rand(4, 3, 16, 16)
    assert own_retrieval(originals + 0.01 * torch.randn_like(originals), originals) == 1.0
    assert own_retrieval(originals.roll(1, 0), originals) == 0.0  # each made from another row's condition
    assert own_retrieval(originals.mean(0, keepdim=True).expand(4, -1, -1, -1), originals) <= 0.25  # one picture for all


def test_a_stage_b_that_ignores_its_semantic_condition_is_named_as_such():
    follows = {"decoder_psnr": 14.0, "decoder_shifted_psnr": 11.5, "decoder_own_retrieval": 0.8}
    assert condition_problems(follows) == []
    ignores = {"decoder_psnr": 10.98, "decoder_shifted_psnr": 10.95, "decoder_own_retrieval": 0.05}
    problems = condition_problems(ignores)
    assert len(problems) == 2 and "a gain of 0.03" in problems[0] and "only 5%" in problems[1]


def test_thumbnail_regression_finds_the_picture_in_latents_that_carry_it_and_not_in_shuffled_ones():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(240, 3, 16, 16, generator=gen)
    y = thumbnails(images)
    assert y.shape == (240, 3 * 8 * 8)
    latents = y @ torch.randn(y.shape[1], 256, generator=gen) + 0.01 * torch.randn(240, 256, generator=gen)  # an invertible linear code
    carried = thumbnail_regression(latents[:200], y[:200], latents[200:], y[200:], penalty=1.0)
    assert carried["r2"] > 0.3 and carried["own_retrieval"] > 0.5
    shuffled = thumbnail_regression(latents[:200][torch.randperm(200, generator=gen)], y[:200], latents[200:], y[200:], penalty=1.0)
    assert shuffled["r2"] < 0.05 and shuffled["own_retrieval"] < 0.2


def test_own_latent_ranks_put_a_latent_near_its_own_first_and_shuffled_ones_at_chance():
    gen = torch.Generator().manual_seed(0)
    cached = torch.randn(400, 16, 6, 6, generator=gen)
    own = list(range(0, 400, 4))  # 100 captions
    near = cached[own] + 0.1 * torch.randn(100, 16, 6, 6, generator=gen)
    assert own_latent_ranks(near, cached, own).tolist() == [1] * 100
    assert own_latent_ranks(cached[:3], cached, [1, 0, 2]).tolist()[2] == 1
    blind = rank_figures(own_latent_ranks(near, cached, own[1:] + own[:1]), len(cached))  # each caption given another's latent
    assert blind["chance_median_rank"] == 200.5 and 100 < blind["median_rank"] < 300 and blind["top10"] < 0.1
    figures = rank_figures(torch.tensor([1, 1, 5, 30]), 400)
    assert figures == {"top1": 0.5, "top10": 0.75, "median_rank": 1.0, "chance_median_rank": 200.5}
    with pytest.raises(ValueError, match="3 sampled latents but 2 own indices"):
        own_latent_ranks(near[:3], cached, [0, 1])


def test_latent_frechet_distance_is_small_for_one_distribution_and_grows_with_a_shift():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(300, 16, 6, 6, generator=gen)
    same = latent_frechet_distance(torch.randn(300, 16, 6, 6, generator=gen), real)
    assert latent_frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    shifted = latent_frechet_distance(torch.randn(300, 16, 6, 6, generator=gen) + 0.5, real)
    scaled = latent_frechet_distance(3 * torch.randn(300, 16, 6, 6, generator=gen), real)
    assert 0 < same < 2 < min(shifted, scaled), (same, shifted, scaled)
    assert shifted == pytest.approx(64 * 0.25 + same, rel=0.2)  # the mean term: 64 pooled features, each 0.5 off
    with pytest.raises(ValueError, match="differ in shape"):
        latent_frechet_distance(real[:, :, :3], real)


def test_caption_retrieval_ranks_each_captions_sample_against_the_cached_latents_seeded():
    """A tiny random prior's samples for four captions, put into a cache of 60 latents: each caption
    finds its own (rank 1) and the sampling is the same on a second call; with the captions' own
    indices rotated the ranks are not 1."""
    torch.manual_seed(0)
    sampler = WuerstchenSampler(StageC.from_flavor("tiny").eval(), ClipTextEncoder.tiny(width=32, seed=1))
    captions = ["a cat", "a dog", "a red apple", "a hat"]
    first = caption_retrieval(sampler, captions, torch.randn(4, 16, 3, 3), [0, 1, 2, 3], 128, 128, steps=2, seed=5)
    assert first["sampled"].shape == (4, 16, 3, 3) and torch.isfinite(first["sampled"]).all()
    cached = torch.cat([torch.randn(56, 16, 3, 3) * first["sampled"].std(), first["sampled"]])
    own = [56, 57, 58, 59]
    found = caption_retrieval(sampler, captions, cached, own, 128, 128, steps=2, seed=5)
    assert found["ranks"].tolist() == [1, 1, 1, 1] and found["top1"] == 1.0 and found["chance_median_rank"] == 30.5
    rotated = caption_retrieval(sampler, captions, cached, own[1:] + own[:1], 128, 128, steps=2, seed=5)
    assert rotated["top1"] == 0.0
    with pytest.raises(ValueError, match="sample at the size the cache was made at"):
        caption_retrieval(sampler, captions, cached, own, 256, 256, steps=2)


def test_a_captioned_grid_puts_each_caption_s_pictures_side_by_side():
    import numpy as np

    from pipelines.pictures import CELL, captioned_grid

    real = np.zeros((5, 40, 40, 3), np.uint8)
    generated = np.full((5, 40, 40, 3), 128, np.uint8)
    grid = captioned_grid([f"emoji {i}" for i in range(5)], [real, generated], headers=["real", "generated"], per_row=3)
    tile_w = 2 * CELL + 4
    assert grid.dtype == np.uint8 and grid.shape[1] == 3 * tile_w and grid.shape[0] > 2 * CELL  # two rows of tiles
    # the first tile, under the header line: the black real picture on the left, the grey generated one beside it
    y = 17 + 2 + CELL // 2
    assert grid[y, 2 + CELL // 2].tolist() == [0, 0, 0] and grid[y, 2 + CELL + CELL // 2].tolist() == [128, 128, 128]
    with pytest.raises(ValueError, match="5 captions and picture columns of lengths"):
        captioned_grid([f"emoji {i}" for i in range(5)], [real[:4]])
