"""The steps of data prep as Ray Data operators: read -> decode + filter -> (CLIP score) ->
deduplicate -> encode -> finalize.

A dropped sample is not removed until `finalize`: it flows on with its `drop_reason` set and no
pixels, so that every drop is counted exactly once, from the data itself (no side counters that
retried tasks could double). An empty `drop_reason` means the sample is kept.

Only the CLIP-score and encoder actors import torch (inside their methods): every Ray worker process
that reads, decodes or deduplicates imports this module, and torch + torchvision would cost each
of them ~3 s of CPU.
"""

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.cache import TENSOR_DTYPES, binary_buffers, tensor_column
from data_prep.config import ClipScoreConfig, DedupConfig, EncodeConfig, FilterConfig, SourceConfig
from data_prep.decode import DecodeError, decode_image
from data_prep.filters import check_rules
from data_prep.hashing import Deduplicator, content_hash, perceptual_hash
from data_prep.transforms import training_pixels

KEEP = ""  # the drop_reason of a kept sample


# -- read -------------------------------------------------------------------------------------

def read_shard(row: dict, source: SourceConfig) -> list[dict]:
    """One source shard -> its raw samples (dropped ones included, with their reason)."""
    if source.format == "twemoji":
        from data_prep.twemoji import iter_twemoji_shard

        samples = iter_twemoji_shard(row["shard_url"], source.render_size, source.shard_size)
    else:
        from data_prep.cache import resolve
        from data_prep.readers import iter_shard

        fs, _ = resolve(row["shard_url"])
        options = {}
        if source.format == "parquet":
            options = {"caption_column": source.caption_column}
            if source.image_column:
                options["image_column"] = source.image_column
        samples = iter_shard(row["shard_url"], fs, row["path"], source.format, **options)
    out = []
    for sample in samples:
        sample = dict(sample)
        sample["caption"] = sample.get("caption") or ""
        sample["drop_reason"] = sample.get("drop_reason") or KEEP
        out.append(sample)
    return out


# -- decode and filter -------------------------------------------------------------------------

def _decode_one(sample: dict, filters: FilterConfig, resolution: int | None, semantic_size: tuple[int, int]) -> dict:
    out = {
        "key": sample["key"], "caption": sample["caption"], "source_shard": sample["source_shard"],
        "metadata": sample.get("metadata") or "{}", "width": 0, "height": 0, "content_hash": "", "phash": 0,
        "clip_score": float("nan"), "drop_reason": sample["drop_reason"], "pixels": b"", "semantic_pixels": b"",
    }
    if out["drop_reason"] != KEEP:
        return out
    data = sample["image_bytes"]
    out["content_hash"] = content_hash(data)
    try:
        image = decode_image(data, max_pixels=filters.max_pixels)
    except DecodeError as err:
        out["drop_reason"] = err.reason
        return out
    out["width"], out["height"] = image.size
    try:
        metadata = json.loads(out["metadata"])
    except ValueError:
        metadata = {}
    reason = check_rules(image.width, image.height, out["caption"], metadata, filters)
    if reason is not None:
        out["drop_reason"] = reason
        return out
    out["phash"] = perceptual_hash(image)
    pixels, semantic = training_pixels(image, resolution, semantic_size)
    out["pixels"] = pixels.tobytes() if pixels is not None else b""
    out["semantic_pixels"] = semantic.tobytes()
    return out


def decode_and_filter(batch: dict, filters: FilterConfig, resolution: int | None, semantic_size: tuple[int, int]) -> dict:
    """Decodes every kept sample, applies the size / aspect / caption / metadata rules, hashes it
    and cuts it to the semantic compressor's size and, unless `resolution` is None (neither Stage A
    nor the CLIP-score filter runs), to the training resolution."""
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    rows = [_decode_one({k: batch[k][i] for k in keys}, filters, resolution, semantic_size) for i in range(n)]
    out = {name: [r[name] for r in rows] for name in (rows[0] if rows else {})}
    if rows:
        out["width"] = np.asarray(out["width"], dtype=np.int32)
        out["height"] = np.asarray(out["height"], dtype=np.int32)
        out["phash"] = np.asarray(out["phash"], dtype=np.uint64)
        out["clip_score"] = np.asarray(out["clip_score"], dtype=np.float32)
    return {k: np.asarray(v, dtype=object) if isinstance(v, list) else v for k, v in out.items()}


# -- CLIP score ----------------------------------------------------------------------------------

def _load_open_clip(cfg: ClipScoreConfig):
    import open_clip

    model_name = cfg.model
    if cfg.model.endswith(".json"):  # a model config of one's own, registered under its file stem
        from pathlib import Path

        open_clip.add_model_config(Path(cfg.model))
        model_name = Path(cfg.model).stem
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=cfg.pretrained)
    tokenizer = open_clip.get_tokenizer(model_name)
    return model.eval(), preprocess, tokenizer


class ClipScoreFilter:
    """LAION-style CLIP filter: cosine similarity of the normalised image and caption embeddings."""

    def __init__(self, cfg: ClipScoreConfig, resolution: int):
        self.cfg, self.resolution = cfg, resolution
        self.model, self.preprocess, self.tokenizer = _load_open_clip(cfg)

    def scores(self, images: list[np.ndarray], captions: list[str]) -> np.ndarray:
        import torch
        from PIL import Image

        with torch.no_grad():
            pixels = torch.stack([self.preprocess(Image.fromarray(im)) for im in images])
            image_emb = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
            text_emb = torch.nn.functional.normalize(self.model.encode_text(self.tokenizer(captions)).float(), dim=-1)
        return (image_emb * text_emb).sum(-1).numpy()

    def __call__(self, batch: dict) -> dict:
        kept = [i for i, reason in enumerate(batch["drop_reason"]) if reason == KEEP]
        if kept:
            side = self.resolution
            images = [np.frombuffer(batch["pixels"][i], np.uint8).reshape(side, side, 3) for i in kept]
            scores = self.scores(images, [str(batch["caption"][i]) for i in kept])
            batch["clip_score"] = np.array(batch["clip_score"], dtype=np.float32)
            for i, score in zip(kept, scores):
                batch["clip_score"][i] = score
                if score < self.cfg.min:
                    batch["drop_reason"][i] = "clip_score"
                    batch["pixels"][i] = batch["semantic_pixels"][i] = b""
        return batch


# -- deduplicate ---------------------------------------------------------------------------------

class DeduplicateStage:
    """Drops exact and near duplicates, within the run and against the cache. One actor sees every
    sample in order, so the first of a group of duplicates is the one kept, run after run."""

    def __init__(self, cfg: DedupConfig, known: list[tuple[str, int | None]]):
        self.enabled = cfg.exact or cfg.near_max_distance is not None
        self.dedup = Deduplicator(cfg.near_max_distance) if self.enabled else None
        self.exact = cfg.exact
        if self.enabled:
            self.dedup.preload((h if self.exact else None, p) for h, p in known)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Takes and returns Arrow tables (batch_format="pyarrow"): the pixel columns pass through
        without being copied into Python objects, unless a row of the batch is dropped here."""
        if not self.enabled:
            return batch
        reasons = batch.column("drop_reason").to_pylist()
        contents = batch.column("content_hash").to_pylist() if self.exact else [None] * len(reasons)
        phashes, keys = batch.column("phash").to_pylist(), batch.column("key").to_pylist()
        dropped = [False] * len(reasons)
        for i, reason in enumerate(reasons):
            if reason == KEEP:
                verdict = self.dedup.check(contents[i], int(phashes[i]), keys[i])
                if verdict is not None:
                    reasons[i], dropped[i] = verdict, True
        if not any(dropped):
            return batch
        columns = {"drop_reason": pa.array(reasons, batch.schema.field("drop_reason").type)}
        for name in ("pixels", "semantic_pixels"):
            columns[name] = pc.if_else(dropped, pa.scalar(b"", batch.schema.field(name).type), batch.column(name))
        for name, column in columns.items():
            batch = batch.set_column(batch.schema.get_field_index(name), name, column)
        return batch


# -- encode ------------------------------------------------------------------------------------

class EncodeStage:
    """The frozen encoders on one device: semantic compressor (-> z_C), optionally Stage A, and the
    text conditioning (embeddings or tokens)."""

    def __init__(self, cfg: EncodeConfig):
        import torch

        from data_prep.encoders import build_semantic_compressor, build_stage_a, build_text_encoder

        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.cpus_per_encoder)  # as many threads as the CPUs the actor reserved
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[cfg.precision]
        self.semantic = build_semantic_compressor(cfg.flavor, cfg.semantic).to(self.device)
        self.stage_a = build_stage_a(cfg.flavor, cfg.stage_a).to(self.device) if cfg.stage_a else None
        self.text = build_text_encoder(cfg).to(self.device)
        self.columns = ["stage_c_latents"] + (["stage_a_latents"] if self.stage_a is not None else [])
        self.columns += ["text_embeddings"] if cfg.text_mode == "embeddings" else ["text_tokens", "text_mask"]

    def _images(self, column, rows: list[int], side: int):
        """The pixels of `rows`, read from the Arrow buffers of a binary column (side x side x 3 bytes per row)."""
        import torch

        offsets, data = binary_buffers(column)
        arrays = np.stack([data[offsets[i] : offsets[i] + side * side * 3] for i in rows]).reshape(-1, side, side, 3)
        tensor = torch.from_numpy(arrays).to(self.device).permute(0, 3, 1, 2)
        return tensor.float().div_(255.0)

    def _encode(self, batch: pa.Table, rows: list[int]) -> dict:
        """The latents of `rows` (at most batch_size of them).

        A sample's latents must not depend on the samples the stream batched it with: a resumed run
        cuts the stream into batches elsewhere than an uninterrupted one, and must reproduce it bit
        for bit. On CPU, oneDNN's convolutions give an image results an fp16 ulp apart, now and
        then, in a batch of another size or at another position of a batch (they process the
        minibatch in blocks). So on CPU the image encoders take one image per call, which costs
        nothing there: on one thread it is faster per image than a batch (the activations stay in
        cache), so run one single-threaded encoder actor per core. The text encoder (matmuls) gave
        the same results at any position and batch size we tried; it gets batches of exactly
        batch_size captions all the same (the last one repeated), so that no kernel choice by batch
        size can differ. On GPU the images are batched and padded the same way.
        """
        import torch

        from stages.latents import semantic_image_size, semantic_to_stage_c

        padded = rows + [rows[-1]] * (self.cfg.batch_size - len(rows))
        images = rows if self.device.type == "cpu" else padded
        side = self.cfg.resolution
        semantic_side = semantic_image_size(side, side)[0]

        def encode_images(encoder, column: str, side: int):
            x = self._images(batch.column(column), images, side)
            if self.device.type == "cpu":
                return torch.cat([encoder(x[i : i + 1]) for i in range(len(rows))])
            return encoder(x)[: len(rows)]

        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.device.type == "cuda")
        with torch.no_grad(), autocast:
            e = encode_images(self.semantic, "semantic_pixels", semantic_side)
            latents = {"stage_c_latents": semantic_to_stage_c(e.float())}
            if self.stage_a is not None:
                latents["stage_a_latents"] = encode_images(self.stage_a.encode, "pixels", side).float()
            ids, mask = self.text.tokenize([str(c) for c in batch.column("caption").take(padded).to_pylist()])
            if self.cfg.text_mode == "embeddings":
                latents["text_embeddings"] = self.text(ids, mask).float()[: len(rows)]
            else:
                latents["text_tokens"], latents["text_mask"] = ids[: len(rows)], mask[: len(rows)]
        return latents

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Takes and returns Arrow tables (batch_format="pyarrow"): the pixels are read from the
        Arrow buffers, the pixel columns are dropped, and each latent column is a binary column
        built from one array (raw little-endian bytes per kept row, empty for a dropped row)."""
        n = batch.num_rows
        kept = np.flatnonzero(pc.equal(batch.column("drop_reason"), KEEP).to_numpy(zero_copy_only=False))
        latents = {name: [] for name in self.columns}
        for first in range(0, len(kept), self.cfg.batch_size):
            rows = kept[first : first + self.cfg.batch_size].tolist()
            for name, values in self._encode(batch, rows).items():
                latents[name].append(values.cpu().numpy().astype(TENSOR_DTYPES[name]))
        batch = batch.drop_columns(["pixels", "semantic_pixels"])
        for name, arrays in latents.items():
            data = np.ascontiguousarray(np.concatenate(arrays)) if arrays else np.zeros(0, np.uint8)
            sizes = np.zeros(n, np.int64)
            sizes[kept] = data.nbytes // max(len(kept), 1)
            offsets = np.concatenate([[0], np.cumsum(sizes)])
            column = pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
            batch = batch.append_column(name, column)
        return batch


# -- finalize ----------------------------------------------------------------------------------

def finalize(batch: pa.Table, shapes: dict[str, list[int]], bucket: str) -> pa.Table:
    """Keeps the kept samples, turns the latent bytes into fixed-shape tensor columns."""
    kept = batch.filter(pc.equal(batch.column("drop_reason"), KEEP))
    columns = {
        "key": kept.column("key").cast(pa.string()),
        "caption": kept.column("caption").cast(pa.string()),
        "source_shard": kept.column("source_shard").cast(pa.string()),
        "width": kept.column("width").cast(pa.int32()),
        "height": kept.column("height").cast(pa.int32()),
        "metadata": kept.column("metadata").cast(pa.string()),
        "content_hash": kept.column("content_hash").cast(pa.string()),
        "phash": kept.column("phash").cast(pa.uint64()),
        "clip_score": kept.column("clip_score").cast(pa.float32()),
        "bucket": pa.array([bucket] * kept.num_rows, pa.string()),
    }
    for name, shape in shapes.items():
        columns[name] = tensor_column(kept.column(name), tuple(shape), TENSOR_DTYPES[name])
    return pa.table(columns)
