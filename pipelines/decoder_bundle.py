"""A decoder bundle as a folder, what `register_decoders` registers from and what the demo decoders
are built as (`python -m pipelines.demo_decoders`):

    decoder/      config.json + diffusion_pytorch_model.safetensors   Stage B (diffusers layout)
    vqgan/        config.json + diffusion_pytorch_model.safetensors   Stage A (diffusers layout)
    semantic_compressor/   the same, when it was trained with Stage B: the prior's latents must be
                  made with it (prep encode.semantic.path); else Stage B learned the latents of the
                  compressor whose fingerprint bundle.json records
    bundle.json   flavor, the decoder text encoder (path or seeded random), the fingerprints of the
                  encoders Stage B was trained with (semantic compressor, Stage A, decoder text),
                  how it was trained and how well it reconstructs

A diffusers pipeline folder (decoder/, vqgan/, text_encoder/) is a bundle without bundle.json."""

import json
from pathlib import Path

from latent_cache.spec import EncoderWeights

BUNDLE_FILE = "bundle.json"
ROOT = Path(__file__).resolve().parents[1]
# The decoders of the bundled demo, trained on the Twemoji set by `python -m pipelines.demo_decoders`.
DEMO_DECODERS = ROOT / "weights" / "twemoji-small-decoders"


def read_meta(folder: str | Path) -> dict | None:
    """The bundle.json of a bundle folder, or None (a diffusers folder or a hub id)."""
    path = Path(folder) / BUNDLE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_meta(folder: Path, meta: dict) -> None:
    (folder / BUNDLE_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def text_encoder_weights(meta: dict) -> EncoderWeights:
    return EncoderWeights(**meta["decoder_text_encoder"])


def load(folder: str | Path):
    """(Stage B, Stage A, decoder text encoder, bundle.json) of a bundle folder with a bundle.json,
    after checking that its Stage A and text encoder are the ones its Stage B was trained with."""
    from latent_cache.encoders import build_decoder_text_encoder, model_fingerprint, text_fingerprint
    from stages import StageA, StageB

    meta = read_meta(folder)
    if meta is None:
        raise FileNotFoundError(f"{folder} has no {BUNDLE_FILE}: not a decoder bundle folder")
    folder = Path(folder)
    stage_b = StageB.from_pretrained(folder / "decoder")
    stage_a = StageA.from_pretrained(folder / "vqgan")
    weights = text_encoder_weights(meta)
    text = build_decoder_text_encoder(meta["flavor"], weights, stage_b.config.clip_embd)
    found = {
        "stage_a": model_fingerprint("stage_a", stage_a, EncoderWeights(str(folder / "vqgan")))["fingerprint"],
        "decoder_text_encoder": text_fingerprint(text, weights)["fingerprint"],
    }
    for what, fingerprint in found.items():
        if meta["fingerprints"].get(what) != fingerprint:
            raise ValueError(f"{folder}: its {what} has fingerprint {fingerprint}, but its Stage B was trained with "
                             f"{meta['fingerprints'].get(what)} ({BUNDLE_FILE})")
    return stage_b, stage_a, text, meta


def load_semantic_compressor(folder: str | Path):
    """The semantic compressor a bundle folder holds (trained with its Stage B), checked against the
    fingerprint its bundle.json records; None when it holds none (its Stage B learned the latents
    of a compressor kept elsewhere)."""
    from latent_cache.encoders import model_fingerprint
    from stages import SemanticCompressor
    from stages.stage_b_with_compressor import COMPRESSOR_FOLDER

    path = Path(folder) / COMPRESSOR_FOLDER
    if not path.is_dir():
        return None
    compressor = SemanticCompressor.from_pretrained(path)
    recorded = (read_meta(folder) or {}).get("fingerprints", {}).get("semantic_compressor")
    fingerprint = model_fingerprint("semantic_compressor", compressor, EncoderWeights(str(path)))["fingerprint"]
    if fingerprint != recorded:
        raise ValueError(f"{folder}: its semantic compressor has fingerprint {fingerprint}, but its Stage B was trained "
                         f"with {recorded} ({BUNDLE_FILE})")
    return compressor
