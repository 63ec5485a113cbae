"""The MLflow pyfunc models that consumers load from the registry, and the text-encoder references
they carry. Nothing here imports Ray: a consumer needs only this package and MLflow.

Stage C (`wuerstchen-stage-c`):
    artifacts  prior/  the EMA weights in the diffusers layout (config.json + safetensors)
    config     flavor, training resolution, the text encoder *reference* (weights path or random-init
               seed, width, fingerprint: checked when loaded), and optionally the URI of a registered
               decoder bundle (`models:/wuerstchen-decoders/N`), referenced, never copied
    predict    prompts -> Stage C latents e (= 42 z_C - 1 for a prior of the v2 latent space), float32 (N, 16, ceil(H/42.67), ceil(W/42.67))
               (what diffusers' prior pipeline calls image_embeddings), or with output="images" and a
               decoder bundle: uint8 images (N, H, W, 3)

Decoders (`wuerstchen-decoders`):
    artifacts  decoder/ (Stage B)  vqgan/ (Stage A)
    config     flavor, the decoder text encoder reference
    predict    {"semantic": float32 (N, 16, h, w), "prompt": [N prompts]} -> uint8 images (N, H, W, 3)
"""

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch

try:  # the base class when MLflow is installed (always, for consumers); plain object otherwise
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object

from latent_cache.spec import EncoderWeights
from pipelines.pictures import to_uint8_images
from stages import StageA, StageB
from stages.latents import stage_c_latent_size
from stages.sampler import DECODER_GUIDANCE, DECODER_STEPS, PRIOR_GUIDANCE, WuerstchenSampler
from stages.text_encoders import ClipTextEncoder

OUTPUTS = ("latents", "images")
# The inference params of the Stage C model, with their defaults (the signature's params schema).
# 0 / [] / "" mean "the model's own default": the default prior grid, the training resolution.
PARAMS = {
    "steps": 0,
    "timesteps": [],
    "guidance": PRIOR_GUIDANCE,
    "seed": 0,
    "height": 0,
    "width": 0,
    "output": "latents",
    "negative_prompt": "",
    "decoder_steps": DECODER_STEPS,
    "decoder_guidance": DECODER_GUIDANCE,
}


# -- text encoder references ----------------------------------------------------------------------

@dataclasses.dataclass
class TextEncoderRef:
    """How to rebuild a text encoder without shipping its weights in every model version: a weights
    path / hub id, or a seeded random init of a given width; the fingerprint proves it is the same."""

    flavor: str
    path: str | None
    seed: int
    width: int | None
    fingerprint: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TextEncoderRef":
        return cls(**values)

    def load(self, check: bool = True) -> ClipTextEncoder:
        from latent_cache.encoders import build_text_encoder, text_fingerprint

        weights = EncoderWeights(self.path, self.seed)
        encoder = build_text_encoder(self.flavor, weights, self.width)
        if check:
            found = text_fingerprint(encoder, weights)["fingerprint"]
            if found != self.fingerprint:
                raise ValueError(
                    f"the text encoder at {self.path or f'random init (seed {self.seed})'} has fingerprint {found}; "
                    f"the model was trained with fingerprint {self.fingerprint}. Point the reference at the same weights."
                )
        return encoder.eval()


def text_encoder_ref(flavor: str, weights: EncoderWeights, width: int | None, encoder=None) -> TextEncoderRef:
    """The reference of the text encoder that `build_text_encoder` makes for these settings (`encoder`:
    that encoder, when the caller has built it already)."""
    from latent_cache.encoders import build_text_encoder, text_fingerprint

    encoder = encoder if encoder is not None else build_text_encoder(flavor, weights, width)
    fingerprint = text_fingerprint(encoder, weights)["fingerprint"]
    return TextEncoderRef(flavor, weights.path, weights.seed, width, fingerprint)


# -- inputs ---------------------------------------------------------------------------------------

def prompts_of(model_input) -> list[str]:
    """Prompts from what pyfunc hands over: a list / array of strings, or a one-column DataFrame
    (MLflow turns a list into one under the signature)."""
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] != 1:
            raise ValueError(f"expected one column of prompts, got columns {list(model_input.columns)}")
        values = model_input.iloc[:, 0].tolist()
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        values = list(np.asarray(model_input, dtype=object).reshape(-1))
    if not values:
        raise ValueError("no prompts given")
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise ValueError(f"every prompt must be a string, got {bad[:3]}")
    return values


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- the models -----------------------------------------------------------------------------------

class DecoderModel(PythonModel):
    """Stage B + Stage A + Stage B's text encoder, registered once and referenced by Stage C versions."""

    def load_context(self, context):
        self.load(Path(context.artifacts["decoders"]), context.model_config)

    def load(self, folder: Path, config: dict):
        device = _device()
        self.config = config
        self.stage_b = StageB.from_pretrained(folder / "decoder").eval().to(device)
        self.stage_a = StageA.from_pretrained(folder / "vqgan").eval().to(device)
        self.text_encoder = TextEncoderRef.from_dict(config["text_encoder"]).load().to(device)
        return self

    def predict(self, context, model_input, params=None):
        params = params or {}
        semantic = torch.as_tensor(np.asarray(model_input["semantic"], dtype=np.float32))
        prompts = prompts_of(model_input["prompt"])
        sampler = WuerstchenSampler(None, None, self.stage_b, self.text_encoder, self.stage_a)
        generator = torch.Generator().manual_seed(int(params.get("seed", 0)))
        z_b = sampler.sample_stage_b(
            semantic, prompts, steps=int(params.get("decoder_steps", DECODER_STEPS)),
            guidance=float(params.get("decoder_guidance", DECODER_GUIDANCE)), generator=generator, progress=False,
        )
        return to_uint8_images(sampler.decode(z_b))


class StageCModel(PythonModel):
    """Prompts -> Stage C latents (or images, when the version references a decoder bundle)."""

    def load_context(self, context):
        self.load(Path(context.artifacts["prior"]), context.model_config)

    def load(self, prior: Path, config: dict, decoders: DecoderModel | None = None):
        import mlflow

        device = _device()
        self.config = config
        from pipelines import registry

        stage_c = registry.stage_c_in(prior, config).eval().to(device)  # a LoRA version: merged into its base
        text = TextEncoderRef.from_dict(config["text_encoder"]).load().to(device)
        if decoders is None and config.get("decoders"):
            decoders = mlflow.pyfunc.load_model(config["decoders"]).unwrap_python_model()
        self.decoders = decoders
        parts = (decoders.stage_b, decoders.text_encoder, decoders.stage_a) if decoders is not None else ()
        self.sampler = WuerstchenSampler(stage_c, text, *parts, latent_space=config.get("latent_space", "v2"))  # as registry.latent_space_of
        return self

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (self.sampler.stage_c.config.c_in, *stage_c_latent_size(height, width))

    def predict(self, context, model_input, params=None):
        prompts = prompts_of(model_input)
        p = {**PARAMS, **(params or {})}
        unknown = sorted(set(p) - set(PARAMS))
        if unknown:
            raise ValueError(f"unknown params {unknown}; known: {sorted(PARAMS)}")
        if p["output"] not in OUTPUTS:
            raise ValueError(f"params.output must be one of {OUTPUTS}, got {p['output']!r}")
        if p["output"] == "images" and not self.sampler.has_decoder:
            raise ValueError(
                "params.output='images' needs decoders; this model version has none (register it with a decoder bundle)"
            )
        height = int(p["height"]) or self.config["resolution"]
        width = int(p["width"]) or self.config["resolution"]
        timesteps = [float(t) for t in p["timesteps"]] or None
        steps = None if timesteps else (int(p["steps"]) or None)
        negative = [p["negative_prompt"]] * len(prompts) if p["negative_prompt"] else None
        output = "semantic" if p["output"] == "latents" else "image"
        result = self.sampler(
            prompts, height=height, width=width, prior_steps=steps, prior_timesteps=timesteps,
            prior_guidance=float(p["guidance"]), decoder_steps=int(p["decoder_steps"]),
            decoder_guidance=float(p["decoder_guidance"]), negative_prompts=negative,
            generator=int(p["seed"]), output=output, progress=False,
        )
        if output == "semantic":
            return result.float().cpu().numpy()
        return to_uint8_images(result)


def signature():
    """Input: a column of prompts; params: PARAMS with their defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {int: "long", float: "double", str: "string"}
    specs = []
    for name, default in PARAMS.items():
        if isinstance(default, list):
            specs.append(ParamSpec(name, "double", default, shape=(-1,)))
        else:
            specs.append(ParamSpec(name, kinds[type(default)], default))
    return ModelSignature(inputs=Schema([ColSpec("string")]), params=ParamSchema(specs))
