"""Whole diffusers pipeline folders: the writer (how users get exports that diffusers' Würstchen
pipelines load) and the reader (a WuerstchenSampler from such a folder or from the hub repositories).

    prior pipeline (WuerstchenPriorPipeline, like warp-ai/wuerstchen-prior):
        model_index.json  prior/  text_encoder/  tokenizer/  scheduler/
    decoder pipeline (WuerstchenDecoderPipeline, like warp-ai/wuerstchen):
        model_index.json  decoder/  vqgan/  text_encoder/  tokenizer/  scheduler/
    combined (WuerstchenCombinedPipeline):
        model_index.json  prior_prior/  prior_text_encoder/  prior_tokenizer/  prior_scheduler/
                          decoder/  vqgan/  text_encoder/  tokenizer/  scheduler/
"""

import json
import shutil
from pathlib import Path

from stages.diffusers_format import DIFFUSERS_VERSION
from stages.latents import LATENT_DIM_SCALE, RESOLUTION_MULTIPLE, latent_space as named_latent_space, latent_space_name
from stages.sampler import WuerstchenSampler
from stages.stage_a import StageA
from stages.stage_b import StageB
from stages.stage_c import StageC
from stages.text_encoders import ClipTextEncoder

MODEL_INDEX = "model_index.json"
_SCHEDULER = {"_class_name": "DDPMWuerstchenScheduler", "_diffusers_version": DIFFUSERS_VERSION, "s": 0.008, "scaler": 1.0}
# Since diffusers deprecated the Würstchen pipelines, `from_pretrained` resolves none of the entries
# the hub repositories and diffusers' own save_pretrained write for these models ("wuerstchen",
# "diffusers"). It does resolve a component's full module path when that module is imported (the
# pipeline classes import these) and holds the loading base class (ModelMixin), as these do.
_DEPRECATED = "diffusers.pipelines.deprecated.wuerstchen."
_COMPONENT_CLASSES = {
    "prior": [_DEPRECATED + "modeling_wuerstchen_prior", "WuerstchenPrior"],
    "decoder": [_DEPRECATED + "modeling_wuerstchen_diffnext", "WuerstchenDiffNeXt"],
    "vqgan": [_DEPRECATED + "modeling_paella_vq_model", "PaellaVQModel"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDPMWuerstchenScheduler"],
}


def _write_text_encoder(encoder: ClipTextEncoder, root: Path, prefix: str) -> None:
    staging = root / f".{prefix}text_encoder_staging"
    encoder.save_pretrained(staging)
    for part in ("text_encoder", "tokenizer"):
        target = root / f"{prefix}{part}"
        if target.exists():
            shutil.rmtree(target)
        (staging / part).rename(target)
    staging.rmdir()


def _write_scheduler(root: Path, name: str) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "scheduler_config.json").write_text(json.dumps(_SCHEDULER, indent=2) + "\n")


def _write_index(root: Path, class_name: str, components: dict[str, str], extra: dict) -> None:
    index = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **extra}
    index.update({name: _COMPONENT_CLASSES[kind] for name, kind in components.items()})
    (root / MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _space_entries(latent_space: str, prefix: str = "") -> dict:
    space = named_latent_space(latent_space)
    # diffusers' names for e = scale z - shift (42 and 1 for the v2 space)
    return {f"{prefix}latent_mean": space.scale, f"{prefix}latent_std": space.shift}


def write_prior_pipeline(directory: str | Path, stage_c: StageC, text_encoder: ClipTextEncoder,
                         latent_space: str = "v2") -> Path:
    root = Path(directory)
    stage_c.save_pretrained(root / "prior")
    _write_text_encoder(text_encoder, root, "")
    _write_scheduler(root, "scheduler")
    extra = {**_space_entries(latent_space), "resolution_multiple": RESOLUTION_MULTIPLE}
    components = {"prior": "prior", "text_encoder": "text_encoder", "tokenizer": "tokenizer", "scheduler": "scheduler"}
    _write_index(root, "WuerstchenPriorPipeline", components, extra)
    return root


def write_decoder_pipeline(
    directory: str | Path, stage_b: StageB, text_encoder: ClipTextEncoder, stage_a: StageA
) -> Path:
    root = Path(directory)
    stage_b.save_pretrained(root / "decoder")
    stage_a.save_pretrained(root / "vqgan")
    _write_text_encoder(text_encoder, root, "")
    _write_scheduler(root, "scheduler")
    components = {
        "decoder": "decoder", "vqgan": "vqgan", "text_encoder": "text_encoder", "tokenizer": "tokenizer",
        "scheduler": "scheduler",
    }
    _write_index(root, "WuerstchenDecoderPipeline", components, {"latent_dim_scale": LATENT_DIM_SCALE})
    return root


def write_combined_pipeline(
    directory: str | Path,
    stage_c: StageC,
    text_encoder_c: ClipTextEncoder,
    stage_b: StageB,
    text_encoder_b: ClipTextEncoder,
    stage_a: StageA,
    latent_space: str = "v2",
) -> Path:
    """diffusers' combined pipeline builds its prior pipeline with the v2 space's latent_mean 42 and
    latent_std 1 whatever its model_index says: for a prior of another space the index records its
    own as prior_latent_mean / prior_latent_std (which `load_sampler` reads), and a diffusers user
    sets them with `pipe.prior_pipe.register_to_config(latent_mean=..., latent_std=...)`."""
    root = Path(directory)
    stage_c.save_pretrained(root / "prior_prior")
    _write_text_encoder(text_encoder_c, root, "prior_")
    _write_scheduler(root, "prior_scheduler")
    stage_b.save_pretrained(root / "decoder")
    stage_a.save_pretrained(root / "vqgan")
    _write_text_encoder(text_encoder_b, root, "")
    _write_scheduler(root, "scheduler")
    components = {
        "prior_prior": "prior", "prior_text_encoder": "text_encoder", "prior_tokenizer": "tokenizer",
        "prior_scheduler": "scheduler", "decoder": "decoder", "vqgan": "vqgan", "text_encoder": "text_encoder",
        "tokenizer": "tokenizer", "scheduler": "scheduler",
    }
    extra = _space_entries(latent_space, "prior_") if latent_space != "v2" else {}
    _write_index(root, "WuerstchenCombinedPipeline", components, extra)
    return root


def write_pipeline(directory: str | Path, sampler: WuerstchenSampler) -> Path:
    """The combined pipeline when the sampler has decoders, else the prior pipeline."""
    if sampler.has_decoder:
        return write_combined_pipeline(
            directory, sampler.stage_c, sampler.text_encoder_c, sampler.stage_b, sampler.text_encoder_b, sampler.stage_a,
            sampler.latent_space,
        )
    return write_prior_pipeline(directory, sampler.stage_c, sampler.text_encoder_c, sampler.latent_space)


def _index(root: Path) -> dict:
    path = root / MODEL_INDEX
    return json.loads(path.read_text()) if path.is_file() else {}


def load_sampler(prior: str | Path, decoder: str | Path | None = None, **load_kwargs) -> WuerstchenSampler:
    """A sampler from diffusers pipeline folders or hub ids: `prior` a prior or combined pipeline
    (e.g. "warp-ai/wuerstchen-prior"), `decoder` a decoder pipeline (e.g. "warp-ai/wuerstchen") unless
    `prior` is a combined one."""
    root = Path(str(prior))
    combined = _index(root).get("_class_name") == "WuerstchenCombinedPipeline"
    p = "prior_" if combined else ""
    stage_c = StageC.from_pretrained(prior, subfolder=f"{p}prior", **load_kwargs)
    text_c = ClipTextEncoder.from_pretrained(prior, f"{p}text_encoder", f"{p}tokenizer")
    index = _index(root)
    extra = {k: v for k, v in index.items() if k == "resolution_multiple"}
    if f"{p}latent_mean" in index:
        extra["latent_space"] = latent_space_name(index[f"{p}latent_mean"], index[f"{p}latent_std"])
    if combined:
        decoder = prior
    if decoder is None:
        return WuerstchenSampler(stage_c, text_c, **extra)
    stage_b = StageB.from_pretrained(decoder, subfolder="decoder", **load_kwargs)
    stage_a = StageA.from_pretrained(decoder, subfolder="vqgan", **load_kwargs)
    text_b = ClipTextEncoder.from_pretrained(decoder, "text_encoder", "tokenizer")
    extra.update({k: v for k, v in _index(Path(str(decoder))).items() if k == "latent_dim_scale"})
    return WuerstchenSampler(stage_c, text_c, stage_b, text_b, stage_a, **extra)
