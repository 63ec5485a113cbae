"""The committed demo decoders (weights/twemoji-small-decoders, made by `python -m pipelines.demo_decoders`):
what the demo registers must be what the bundle says it is, reconstruct held-out emoji from their own
semantic latents (measured again here, on emoji rendered from the packaged SVGs, not read from the
bundle's record), pin the prior's cache through its compressor, and load in diffusers."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import load
from data_prep.config import PrepConfig
from data_prep.decode import decode_image
from data_prep.sources.twemoji import render_png, twemoji_entries
from data_prep.transforms import training_pixels
from latent_cache.encoders import fold_batchnorm, model_fingerprint
from latent_cache.reader import is_validation
from latent_cache.spec import EncoderWeights
from pipelines import decoder_bundle, demo_decoders
from pipelines.quality import bundle_quality, condition_problems
from pipelines.training.config import TrainConfig
from stages import SemanticCompressor, StageA
from stages.latents import semantic_image_size, semantic_to_stage_c
from stages.stage_b_with_compressor import COMPRESSOR_FOLDER

BUNDLE = decoder_bundle.DEMO_DECODERS


@pytest.fixture(scope="module")
def bundle():
    if decoder_bundle.read_meta(BUNDLE) is None:
        pytest.fail(f"{BUNDLE} has no bundle.json: the demo decoders are part of the repository")
    stage_b, stage_a, text, meta = decoder_bundle.load(BUNDLE)  # checks the Stage A and text fingerprints
    return {"stage_b": stage_b, "stage_a": stage_a, "text": text, "meta": meta,
            "compressor": decoder_bundle.load_semantic_compressor(BUNDLE)}


def test_the_bundle_holds_what_it_says_and_is_small(bundle):
    files = {p.relative_to(BUNDLE).as_posix() for p in BUNDLE.rglob("*") if p.is_file()}
    for folder in ("decoder", "vqgan", COMPRESSOR_FOLDER):
        assert {f"{folder}/config.json", f"{folder}/diffusion_pytorch_model.safetensors"} <= files, folder
    assert {"bundle.json", "reconstructions.png"} <= files and not (BUNDLE / demo_decoders.REJECTED_FILE).exists()
    assert sum((BUNDLE / f).stat().st_size for f in files) < 30e6
    meta = bundle["meta"]
    assert meta["flavor"] == "small" and not condition_problems(
        {k: v["trained"] for k, v in meta["reconstruction"]["figures"].items()})


def test_the_configs_name_the_bundle_and_its_scale(bundle):
    """The configs that made it and the demo's prior cache agree with the committed weights."""
    b_cfg = load(TrainConfig, demo_decoders.TRAIN_STAGE_B, [])
    stage_a_scale = json.loads((BUNDLE / "vqgan" / "config.json").read_text())["scale_factor"]
    assert b_cfg.decoder_objective.scale_factor == pytest.approx(stage_a_scale, abs=1e-4)
    assert b_cfg.model.train_semantic_compressor and bundle["compressor"] is not None
    fingerprints = bundle["meta"]["fingerprints"]
    path = BUNDLE / COMPRESSOR_FOLDER
    compressor = SemanticCompressor.from_pretrained(path)
    assert model_fingerprint("semantic_compressor", compressor, EncoderWeights(str(path)))["fingerprint"] == \
        fingerprints["semantic_compressor"]
    # the demo's prior cache is made with that compressor: its encoders config points at the folder
    prep = load(PrepConfig, demo_decoders.CONFIGS / "prep_twemoji.yaml", [f"encode.semantic.path={path}"])
    assert prep.encode.flavor == bundle["meta"]["flavor"]


def _held_out_emoji(count: int, resolution: int = 256) -> dict:
    """`count` held-out emoji (the training's validation split, by key hash) spread over the set,
    rendered and cut as prep does: {"caption", "images" (N, 3, R, R), "semantic_images"} in [0, 1]."""
    fraction = load(TrainConfig, demo_decoders.TRAIN_STAGE_B, []).data.validation_fraction
    held = [e for e in twemoji_entries() if is_validation(f"twemoji/{e['key']}", fraction)]
    picks = held[:: max(1, len(held) // count)][:count]
    images, semantic = [], []
    for entry in picks:
        image = decode_image(render_png(entry["svg_path"], resolution))
        pixels, small = training_pixels(image, (resolution, resolution), semantic_image_size(resolution, resolution))
        images.append(pixels)
        semantic.append(small)

    def tensor(arrays):
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255.0)

    return {"caption": [e["caption"] for e in picks], "images": tensor(images), "semantic_images": tensor(semantic)}


def test_it_regenerates_held_out_emoji_from_their_own_semantic_latents(bundle):
    """Measured here on 8 held-out emoji: Stage A reconstructs them, and what the decoders make of an
    emoji's own semantic latent is nearer the emoji than what they make of another's."""
    rows = _held_out_emoji(8)
    compressor = fold_batchnorm(bundle["compressor"]).eval()
    with torch.no_grad():
        rows["stage_c_latents"] = semantic_to_stage_c(compressor(rows["semantic_images"]))
    figures = bundle_quality(bundle["stage_b"], bundle["stage_a"], bundle["text"], rows)
    assert figures["stage_a_psnr"] > 20, figures
    assert figures["decoder_psnr"] - figures["decoder_shifted_psnr"] > 1.0, figures
    assert figures["decoder_own_retrieval"] >= 0.5, figures
    assert figures["images"].std() > 0.05, "blank pictures"


def test_the_bundle_exports_to_a_diffusers_pipeline_with_the_same_images(bundle, tmp_path):
    from diffusers import WuerstchenCombinedPipeline

    from latent_cache.encoders import build_text_encoder
    from stages import StageC
    from stages.diffusers_pipeline import write_combined_pipeline
    from stages.sampler import WuerstchenSampler

    torch.manual_seed(0)
    stage_c, text_c = StageC.from_flavor("small").eval(), build_text_encoder("small", EncoderWeights(None, 0))
    write_combined_pipeline(tmp_path / "pipe", stage_c, text_c, bundle["stage_b"], bundle["text"], bundle["stage_a"])
    pipe = WuerstchenCombinedPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("grinning face", height=256, width=256, prior_num_inference_steps=3, num_inference_steps=4,
                  prior_guidance_scale=4.0, decoder_guidance_scale=0.0, generator=torch.Generator().manual_seed(3),
                  output_type="pt").images
    sampler = WuerstchenSampler(stage_c, text_c, bundle["stage_b"].eval(), bundle["text"], bundle["stage_a"].eval())
    ours = sampler(["grinning face"], height=256, width=256, prior_steps=3, decoder_steps=4, prior_guidance=4.0,
                   decoder_guidance=0.0, generator=3, progress=False)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    Image.open(io.BytesIO((BUNDLE / "reconstructions.png").read_bytes())).verify()
