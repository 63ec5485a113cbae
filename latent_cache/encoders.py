"""The frozen encoders of data prep, built the same way wherever they run (prep actors, the trainer
in `tokens` mode), and their fingerprints: a hash of config and weights that the cache records so a
trainer can refuse latents made by other encoders."""

import dataclasses
import hashlib
import json

import torch

from latent_cache.spec import CacheSpec, EncoderWeights
from stages import SemanticCompressor, StageA, StageB, StageC
from stages.original_format import load_original, load_original_semantic_compressor
from stages.text_encoders import ClipTextEncoder


class EncoderConfigError(ValueError):
    """Encoder settings that cannot produce a cache (e.g. v2 sizes without weights)."""


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _needs_weights(flavor: str, what: str, weights: EncoderWeights) -> None:
    if weights.path is None and flavor == "v2":
        raise EncoderConfigError(
            f"the v2 {what} needs its checkpoint: set its `path` (random init is only for the tiny and small flavors)"
        )


def calibration_images(seed: int, count: int = 64, side: int = 128) -> torch.Tensor:
    """Seeded synthetic pictures in [0, 1]: smooth colour fields at several scales, like photos' spectra."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, 3, side, side)
    for cells in (2, 4, 8, 16, 32):
        noise = torch.rand(count, 3, cells, cells, generator=gen)
        images += torch.nn.functional.interpolate(noise, size=side, mode="bicubic", align_corners=False) / cells**0.5
    images -= images.amin(dim=(1, 2, 3), keepdim=True)
    return images / images.amax(dim=(1, 2, 3), keepdim=True)


@torch.no_grad()
def calibrate_batchnorm(model: torch.nn.Module, forward, seed: int) -> torch.nn.Module:
    """Sets every BatchNorm's running statistics from seeded synthetic images.

    A randomly initialised network in eval mode uses BN statistics of mean 0 and variance 1, which do
    not match its activations: a random EfficientNet's features then shrink towards zero layer after
    layer, and every image gets the same latent. With calibrated statistics the outputs are
    normalised as a trained encoder's are (the semantic latent e has about mean 0 and std 1)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    model.eval()  # stochastic depth and dropout stay off: the result must not depend on any RNG
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the calibration batches
        bn.train()
    for batch in calibration_images(seed).split(16):
        forward(model, batch)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


@torch.no_grad()
def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Folds each BatchNorm2d that directly follows a Conv2d in a Sequential into the convolution
    (eval-mode statistics into its weights and bias), in place, for inference. It computes the same
    function up to fp32 rounding (~1e-5 relative, below the fp16 the latents are stored in) with half
    the layers: for a small network on small images, per-layer overhead is a large share of the time,
    and the CPU job threads take turns on the GIL for it. Fingerprint the model before folding."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for sequential in [m for m in model.modules() if isinstance(m, torch.nn.Sequential)]:
        names = list(sequential._modules)
        for conv_name, bn_name in zip(names, names[1:]):
            conv, bn = sequential._modules[conv_name], sequential._modules[bn_name]
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                sequential._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                sequential._modules[bn_name] = torch.nn.Identity()
    return model


def build_semantic_compressor(flavor: str, weights: EncoderWeights) -> SemanticCompressor:
    """From a diffusers-style folder, an original Stage B `.pt` (its effnet_state_dict), or seeded
    random init with calibrated BatchNorm statistics (tiny / small flavors)."""
    _needs_weights(flavor, "semantic compressor", weights)
    if weights.path is None:
        model = _seeded(weights.seed, lambda: SemanticCompressor.from_flavor(flavor))
        return calibrate_batchnorm(model, lambda m, x: m(x), weights.seed)
    if weights.path.endswith((".pt", ".pth", ".ckpt")):
        return load_original_semantic_compressor(weights.path, flavor=flavor)
    return SemanticCompressor.from_pretrained(weights.path)


def build_stage_a(flavor: str, weights: EncoderWeights) -> StageA:
    """From a diffusers folder or hub id (its vqgan/ subfolder is found), an original `.pt`, or seeded random init."""
    _needs_weights(flavor, "Stage A", weights)
    if weights.path is None:
        model = _seeded(weights.seed, lambda: StageA.from_flavor(flavor))
        return calibrate_batchnorm(model, lambda m, x: m.encode(x), weights.seed)
    if weights.path.endswith((".pt", ".pth", ".ckpt")):
        return load_original(StageA, weights.path, flavor=flavor)
    return StageA.from_pretrained(weights.path)


def text_width(flavor: str, width: int | None = None) -> int:
    """The width of the text encoder: as configured, or the flavor's Stage C c_cond."""
    return width or StageC.flavor_config(flavor).c_cond


def decoder_text_width(flavor: str, width: int | None = None) -> int:
    """The width of the decoder's text encoder: as configured, or the flavor's Stage B clip_embd."""
    return width or StageB.flavor_config(flavor).clip_embd


def _text_tower(what: str, flavor: str, weights: EncoderWeights, width: int) -> ClipTextEncoder:
    _needs_weights(flavor, what, weights)
    if weights.path is not None:
        return ClipTextEncoder.from_pretrained(weights.path)
    heads = next(h for h in (8, 4, 2, 1) if width % h == 0)
    return ClipTextEncoder.tiny(width=width, layers=2, heads=heads, seed=weights.seed)


def build_text_encoder(flavor: str, weights: EncoderWeights, width: int | None = None) -> ClipTextEncoder:
    """Stage C's text encoder: a transformers CLIP folder / hub id, or a seeded random tiny tower of
    `width` (default: the flavor's c_cond) with the real CLIP tokenizer."""
    return _text_tower("text encoder", flavor, weights, text_width(flavor, width))


def build_decoder_text_encoder(flavor: str, weights: EncoderWeights, width: int | None = None) -> ClipTextEncoder:
    """Stage B's text encoder (v2: CLIP ViT-H, e.g. the text_encoder of warp-ai/wuerstchen), or a
    seeded random tiny tower of `width` (default: the flavor's Stage B clip_embd)."""
    return _text_tower("decoder text encoder", flavor, weights, decoder_text_width(flavor, width))


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict, in key order (names, dtypes, shapes, bytes)."""
    return state_digest(module.state_dict())


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """`weights_digest` of a state dict."""
    digest = hashlib.sha256()
    for key, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _fingerprint(kind: str, config: dict, weights_hash: str) -> dict:
    body = json.dumps({"kind": kind, "config": config, "weights": weights_hash}, sort_keys=True)
    return {"kind": kind, "config": config, "fingerprint": hashlib.sha256(body.encode()).hexdigest()[:32]}


def model_fingerprint(kind: str, model, weights: EncoderWeights) -> dict:
    info = _fingerprint(kind, dataclasses.asdict(model.config), weights_digest(model))
    info["weights"] = weights.path or f"random init (seed {weights.seed}), BatchNorm calibrated on seeded synthetic images"
    return info


def build_encoders(spec: CacheSpec) -> tuple[SemanticCompressor, ClipTextEncoder, StageA | None, ClipTextEncoder | None]:
    """(semantic compressor, text encoder, Stage A or None, decoder text encoder or None) of a cache spec."""
    semantic = build_semantic_compressor(spec.flavor, spec.semantic)
    stage_a = build_stage_a(spec.flavor, spec.stage_a) if spec.stage_a is not None else None
    text = build_text_encoder(spec.flavor, spec.text_encoder, spec.text_width)
    decoder_text = None
    if spec.decoder_text_encoder is not None:
        decoder_text = build_decoder_text_encoder(spec.flavor, spec.decoder_text_encoder, spec.decoder_text_width)
    return semantic, text, stage_a, decoder_text


def encoder_fingerprints(spec: CacheSpec, semantic, text: ClipTextEncoder, stage_a=None, decoder_text=None) -> dict:
    """The fingerprint of each encoder of a prep run, as the cache's manifest records them."""
    fingerprints = {
        "semantic_compressor": model_fingerprint("semantic_compressor", semantic, spec.semantic),
        "text_encoder": text_fingerprint(text, spec.text_encoder),
    }
    if stage_a is not None:
        fingerprints["stage_a"] = model_fingerprint("stage_a", stage_a, spec.stage_a)
    if decoder_text is not None:
        fingerprints["decoder_text_encoder"] = text_fingerprint(decoder_text, spec.decoder_text_encoder)
    return fingerprints


def spec_fingerprints(spec: CacheSpec) -> tuple[dict, int]:
    """(fingerprint of each encoder, text width), with the encoders built here. A prep run with rows
    takes them from its encoder actors instead (what they state, see `latent_cache.writer`); this is
    for a run with nothing to encode, which still checks the cache against its spec."""
    semantic, text, stage_a, decoder_text = build_encoders(spec)
    return encoder_fingerprints(spec, semantic, text, stage_a, decoder_text), text.width


def text_fingerprint(encoder: ClipTextEncoder, weights: EncoderWeights) -> dict:
    vocab = json.dumps(encoder.tokenizer.get_vocab(), sort_keys=True)
    config = {"backend": encoder.backend, "width": encoder.width, "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest()}
    info = _fingerprint("text_encoder", config, weights_digest(encoder.model))
    info["weights"] = weights.path or f"random init (seed {weights.seed})"
    return info
