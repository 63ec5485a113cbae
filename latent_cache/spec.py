"""What a cache's latents and text conditioning are made with, and the tensor columns that follows.

Tensor columns use Arrow's canonical `arrow.fixed_shape_tensor` extension type, so plain pyarrow (or
any Arrow reader) recovers each tensor's shape; Ray reads them as tensors. Columns of a cache:
    key, caption, source_shard (str); width, height (int32, the source image); metadata (JSON str);
    content_hash (str), phash (uint64), clip_score (float32, NaN when not computed); bucket (str "HxW",
    the shape the image was cut to: latent_cache/buckets.py; a cache's files each hold one bucket);
    stage_c_latents  float16 [16, h, w]   z_C = (e + 1) / 42, what Stage C learns
    stage_a_latents  float16 [4, H/4, W/4] Stage A encoder output (optional, for Stage B)
    text_embeddings  float16 [77, width]   (text_mode "embeddings")
    text_tokens int32 [77] + text_mask int8 [77]   (text_mode "tokens")
    decoder_text_embeddings float16 [77, width]   the decoder's text conditioning (optional, for Stage B;
                     the v2 decoder's is CLIP ViT-H's last_hidden_state), in either text mode
    images           uint8 [R, R, 3]       the training image itself, RGB, as the encoders saw it
                     (optional, for Stage A training: decoded, filtered and cropped once by prep)
    semantic_images  uint8 [S, S, 3]       the semantic compressor's input (S = 0.75 R on a multiple
                     of 32), exactly as prep cut it (optional, for Stage B trained with its compressor)
"""

import dataclasses

import numpy as np

from core.config import config_dataclass

TENSOR_DTYPES = {
    "stage_c_latents": np.float16,
    "stage_a_latents": np.float16,
    "text_embeddings": np.float16,
    "text_tokens": np.int32,
    "text_mask": np.int8,
    "decoder_text_embeddings": np.float16,
    "images": np.uint8,
    "semantic_images": np.uint8,
}
# text mode -> the columns of its text conditioning
TEXT_COLUMNS = {"embeddings": ["text_embeddings"], "tokens": ["text_tokens", "text_mask"]}
TEXT_MODES = tuple(TEXT_COLUMNS)


@config_dataclass
class EncoderWeights:
    """A checkpoint for one encoder; None means random init with `seed` (for tiny/small demos), which
    the manifest records."""

    path: str | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Everything that decides what a cache's rows hold: a cache is made, appended to and read for
    one spec (checked against its manifest, see `latent_cache.manifest`)."""

    flavor: str  # the semantic compressor / Stage A / text encoder flavor
    resolution: int  # training image side (square center crop)
    text_mode: str  # "embeddings" (fp16 last_hidden_state) or "tokens" (ids + mask)
    semantic: EncoderWeights
    text_encoder: EncoderWeights
    stage_a: EncoderWeights | None = None  # Stage A latents (for Stage B training); None = not encoded
    text_width: int | None = None  # width of a random text encoder (default: the flavor's Stage C c_cond)
    # The decoder's text encoder (for Stage B training); None = its conditioning is not encoded.
    decoder_text_encoder: EncoderWeights | None = None
    decoder_text_width: int | None = None  # width of a random one (default: the flavor's Stage B clip_embd)
    images: bool = False  # the cropped training images themselves (for Stage A training)
    semantic_images: bool = False  # the semantic compressor's input images (for Stage B trained with it)
    # The aspect-ratio buckets ("HxW", latent_cache/buckets.py); () = the square RxR only.
    buckets: tuple[str, ...] = ()

    @property
    def bucket(self) -> str:
        """The square bucket, RxR."""
        return f"{self.resolution}x{self.resolution}"

    @property
    def bucket_names(self) -> list[str]:
        return list(self.buckets) or [self.bucket]

    @property
    def bucketed(self) -> bool:
        """Whether the cache holds other shapes than the square."""
        return self.bucket_names != [self.bucket]

    @property
    def text_columns(self) -> list[str]:
        return list(TEXT_COLUMNS[self.text_mode])

    @property
    def decoder_text_columns(self) -> list[str]:
        return ["decoder_text_embeddings"] if self.decoder_text_encoder is not None else []

    @property
    def latent_columns(self) -> list[str]:
        return ["stage_c_latents"] + (["stage_a_latents"] if self.stage_a is not None else [])

    @property
    def image_columns(self) -> list[str]:
        return ["images"] * self.images + ["semantic_images"] * self.semantic_images

    def tensor_shapes(self, text_width: int, decoder_text_width: int | None = None, bucket: str | None = None) -> dict[str, list[int]]:
        """The shape of every tensor column of a bucket's rows (default: the square's), given the
        widths of the text encoders really used (a pretrained one has its own). `stages` is imported
        here, not at the top: the prep config imports this module on every Ray worker that reads or
        decodes, and torch costs each ~3 s."""
        from latent_cache.buckets import parse
        from stages.latents import semantic_image_size
        from stages.text_encoders import CONTEXT_LENGTH

        height, width = parse(bucket or self.bucket)
        sem_h, sem_w = semantic_image_size(height, width)
        shapes = {"stage_c_latents": [16, sem_h // 32, sem_w // 32]}
        if self.stage_a is not None:
            shapes["stage_a_latents"] = [4, height // 4, width // 4]
        if self.text_mode == "embeddings":
            shapes["text_embeddings"] = [CONTEXT_LENGTH, text_width]
        else:
            shapes["text_tokens"] = [CONTEXT_LENGTH]
            shapes["text_mask"] = [CONTEXT_LENGTH]
        if self.decoder_text_encoder is not None:
            if decoder_text_width is None:
                raise ValueError("the shape of decoder_text_embeddings needs the decoder text encoder's width")
            shapes["decoder_text_embeddings"] = [CONTEXT_LENGTH, decoder_text_width]
        if self.images:
            shapes["images"] = [height, width, 3]
        if self.semantic_images:
            shapes["semantic_images"] = [sem_h, sem_w, 3]
        return shapes

    def bucket_shapes(self, text_width: int, decoder_text_width: int | None = None) -> dict[str, dict[str, list[int]]]:
        """Every bucket's `tensor_shapes`."""
        return {b: self.tensor_shapes(text_width, decoder_text_width, b) for b in self.bucket_names}

    def settings(self) -> dict:
        """What the manifest records of the spec besides the encoders' fingerprints and the shapes."""
        return {"flavor": self.flavor, "resolution": self.resolution, "bucket": self.bucket, "text_mode": self.text_mode}


def decoder_text_width(encoders: dict) -> int | None:
    """The width of the decoder text encoder among a cache's encoder fingerprints (None: it has none)."""
    info = encoders.get("decoder_text_encoder")
    return info["config"]["width"] if info else None
