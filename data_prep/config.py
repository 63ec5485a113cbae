"""What a data-prep run is told: where the data is, how it is filtered, how it is encoded, where the
cache goes. The job reads it from YAML (`core/config.py`); every field has a working default."""

import dataclasses
from typing import Annotated

from pydantic import Field, NonNegativeInt, PositiveInt, model_validator
from pydantic_core import ArgsKwargs

from core.config import config_dataclass
from data_prep.decode import DEFAULT_MAX_PIXELS
from data_prep.sources import FORMATS as SOURCE_FORMATS
from latent_cache.buckets import SQUARE, resolve
from latent_cache.spec import TEXT_MODES, CacheSpec, EncoderWeights

# The original Würstchen data filter (dome272/Wuerstchen utils.py WebdatasetFilter, used for v1 and v2):
# 512 <= original side <= 4096, pwatermark <= 0.5, aesthetic >= 5.0, punsafe <= 0.99.
PRESETS = {
    "wuerstchen_original": dict(
        min_side=512,
        max_side=4096,
        metadata={
            "pwatermark": {"max": 0.5},
            "aesthetic|AESTHETIC_SCORE": {"min": 5.0},
            "punsafe": {"max": 0.99},
        },
    ),
}


@config_dataclass
class SourceConfig:
    url: str = "twemoji://"  # /path, file://, s3://bucket/prefix, a glob in the last part, or twemoji://
    format: str = "twemoji"
    # The options of the formats' readers (see data_prep/sources/), each read by its own format.
    image_column: str | None = None  # parquet sources: the image bytes column (auto-detected when None)
    caption_column: str = "caption"  # parquet sources
    shard_size: PositiveInt = 256  # twemoji:// only: emoji per shard
    render_size: PositiveInt = 256  # twemoji:// only: the SVGs are rendered at this size
    subset: PositiveInt | None = None  # twemoji:// only: this many emoji spread evenly over the set (None: all)

    def __post_init__(self):
        if self.format not in SOURCE_FORMATS:
            raise ValueError(f"source.format must be one of {SOURCE_FORMATS}, got {self.format!r}")


@config_dataclass
class Threshold:
    min: float | None = None
    max: float | None = None

    def __post_init__(self):
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min={self.min} is above max={self.max}: no sample could pass")


@config_dataclass
class ClipScoreConfig:
    """LAION-style: cosine similarity of the open_clip image and text embeddings, kept when >= min."""

    model: str = "ViT-B-32"  # an open_clip model name, or a path to an open_clip model config JSON
    pretrained: str | None = None  # a tag of open_clip's (e.g. laion2b_s34b_b79k) or a local weights file
    min: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.28  # a cosine similarity
    batch_size: PositiveInt = 64
    # Tests only: score with randomly initialised weights (open_clip's result when `pretrained` is
    # None), which drops arbitrary samples. Without it, a missing `pretrained` is refused.
    random_weights: bool = False

    def __post_init__(self):
        if self.pretrained is None and not self.random_weights:
            raise ValueError(
                "filters.clip_score.pretrained is not set: the CLIP score would come from random weights and "
                "drop arbitrary samples. Set pretrained to an open_clip tag (e.g. laion2b_s34b_b79k) or a local "
                "weights file (random_weights: true is for tests only)"
            )
        if self.pretrained is not None and self.random_weights:
            raise ValueError(f"filters.clip_score sets both pretrained={self.pretrained!r} and random_weights: "
                             f"true; keep one")


@config_dataclass
class DedupConfig:
    exact: bool = True  # the same image bytes
    near_max_distance: Annotated[int, Field(ge=0, le=64)] | None = None  # pHash (64 bits) Hamming distance; None = off


@config_dataclass
class FilterConfig:
    preset: str | None = None  # a named set of the fields below, which the fields below then override
    min_side: NonNegativeInt = 0
    max_side: PositiveInt | None = None
    max_aspect: Annotated[float, Field(ge=1.0)] | None = None  # long side / short side
    min_caption_words: NonNegativeInt = 0
    min_caption_chars: NonNegativeInt = 1
    max_caption_chars: PositiveInt | None = None
    # metadata key -> threshold; "a|b" takes whichever key the sample has (LAION's aesthetic columns)
    metadata: dict[str, Threshold] = dataclasses.field(default_factory=dict)
    max_pixels: PositiveInt = DEFAULT_MAX_PIXELS  # decompression-bomb bound (PIL's default)
    clip_score: ClipScoreConfig | None = None
    dedup: DedupConfig = dataclasses.field(default_factory=DedupConfig)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, given):
        """The preset fills the fields that were not given: a given value wins even when it equals the
        field's default (min_side: 0, max_side: null). Given metadata thresholds are merged into the
        preset's key by key (a given key replaces that key's threshold), as one tightens or adds one
        threshold without restating the others. Resolved here, where the given keys are still known;
        the result is stable: building it again from its own fields changes nothing."""
        if isinstance(given, ArgsKwargs):
            values = {**dict(zip((f.name for f in dataclasses.fields(cls)), given.args)), **(given.kwargs or {})}
        elif isinstance(given, dict):
            values = dict(given)
        else:
            return given
        preset = PRESETS.get(values.get("preset")) if isinstance(values.get("preset"), str) else None
        if preset is None:  # none, or unknown: __post_init__ says which ones exist
            return given
        for name, value in preset.items():
            if name not in values:
                values[name] = dict(value) if isinstance(value, dict) else value
            elif name == "metadata" and isinstance(values[name], dict):
                values[name] = {**value, **values[name]}
        return ArgsKwargs((), values) if isinstance(given, ArgsKwargs) else values

    def __post_init__(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"filters.preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.max_side is not None and self.min_side > self.max_side:
            raise ValueError(f"filters.min_side={self.min_side} is above max_side={self.max_side}: no image could pass")
        if self.max_caption_chars is not None and self.min_caption_chars > self.max_caption_chars:
            raise ValueError(f"filters.min_caption_chars={self.min_caption_chars} is above "
                             f"max_caption_chars={self.max_caption_chars}: no caption could pass")


@config_dataclass
class EncodeConfig:
    flavor: str = "small"  # the semantic compressor / Stage A / text encoder flavor
    resolution: PositiveInt = 256  # training image side (square center crop)
    semantic: EncoderWeights = dataclasses.field(default_factory=EncoderWeights)
    stage_a: EncoderWeights | None = None  # Stage A latents (for Stage B training); None = not encoded
    text_mode: str = "embeddings"  # "embeddings" (fp16 last_hidden_state) or "tokens" (ids + mask)
    text_encoder: EncoderWeights = dataclasses.field(default_factory=EncoderWeights)
    text_width: PositiveInt | None = None  # width of a random text encoder (default: the flavor's Stage C c_cond)
    # The decoder's text conditioning, for Stage B training (v2: CLIP ViT-H, e.g. the text_encoder of
    # warp-ai/wuerstchen); None = not encoded. Always cached as embeddings.
    decoder_text_encoder: EncoderWeights | None = None
    decoder_text_width: PositiveInt | None = None  # width of a random one (default: the flavor's Stage B clip_embd)
    # Keep the cropped training images themselves (uint8, resolution^2 x 3 bytes a row), for Stage A
    # training: it then reads decoded, filtered, cropped pixels instead of decoding the source again.
    images: bool = False
    # Keep the semantic compressor's input images (uint8, (0.75 x resolution)^2 x 3 bytes a row), for
    # Stage B trained together with its compressor (model.train_semantic_compressor).
    semantic_images: bool = False
    # Aspect-ratio buckets (latent_cache/buckets.py): "square" (every image cut to its centre square),
    # "aspect" (up to 11 shapes of about resolution^2 pixels from 1:2 to 2:1, each image cut to the one
    # nearest its aspect ratio), or a list of "HxW" shapes (the square among them). Each bucket's rows
    # go into files of their own tensor shapes; the manifest lists the buckets and their counts.
    buckets: str | list[str] = "square"
    batch_size: PositiveInt = 32
    # On GPU, Stage A takes the batch in parts of this many images: at 1024 px its first blocks hold
    # 192 x 512 x 512 values per image, and CUDA's replication padding indexes a tensor with 32 bits.
    stage_a_batch_size: PositiveInt = 8
    num_encoders: PositiveInt = 1  # encoder actors; on CPU, one per node is enough (its threads share the weights)
    # CPUs each encoder actor reserves, and its threads: they decode the images and cut the squares the
    # encoders take (on GPU while the device encodes; ~30 ms of CPU an image at 1024 px), and on CPU
    # also encode them, one image each at a time.
    cpus_per_encoder: PositiveInt = 1
    use_gpu: bool = False
    precision: str = "fp16"  # on GPU: fp16 or bf16 autocast, or fp32 (no autocast)

    def __post_init__(self):
        if self.text_mode not in TEXT_MODES:
            raise ValueError(f"encode.text_mode must be one of {TEXT_MODES}, got {self.text_mode!r}")
        if self.resolution % 32:
            raise ValueError(f"encode.resolution must be a multiple of 32, got {self.resolution}")
        if self.precision not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"encode.precision must be fp16, bf16 or fp32, got {self.precision!r}")
        resolve(self.buckets, self.resolution)  # a clear error now, not in the encoder actors

    def spec(self) -> CacheSpec:
        """What the cache's rows hold; the other fields say how the encoders run."""
        return CacheSpec(flavor=self.flavor, resolution=self.resolution, text_mode=self.text_mode, semantic=self.semantic,
                         text_encoder=self.text_encoder, stage_a=self.stage_a, text_width=self.text_width,
                         decoder_text_encoder=self.decoder_text_encoder, decoder_text_width=self.decoder_text_width,
                         images=self.images, semantic_images=self.semantic_images,
                         buckets=() if self.buckets == SQUARE else tuple(resolve(self.buckets, self.resolution)))


@config_dataclass
class OutputConfig:
    url: str = "runs/cache/twemoji"  # local path or s3://bucket/prefix
    max_rows_per_file: PositiveInt = 2048
    shards_per_wave: PositiveInt = 4  # source shards committed together; a killed run redoes at most one wave


@config_dataclass
class PrepConfig:
    source: SourceConfig = dataclasses.field(default_factory=SourceConfig)
    filters: FilterConfig = dataclasses.field(default_factory=FilterConfig)
    encode: EncodeConfig = dataclasses.field(default_factory=EncodeConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    ray_address: str | None = None  # None: the cluster of `ray job submit`, or a local one
    num_cpus: PositiveInt | None = None  # for a local cluster only
    limit_shards: PositiveInt | None = None  # process at most this many new shards (smoke runs)
