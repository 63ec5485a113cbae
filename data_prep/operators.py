"""The Ray Data operators of data prep, and the line they form (`prep_dataset`): read -> decode +
filter -> (CLIP score) -> deduplicate -> encode, into the cache's writer (`latent_cache.writer`).

A dropped sample is not removed until the writer: it flows on with its `drop_reason` set and no
pixels, so that every drop is counted exactly once, from the data itself (no side counters that
retried tasks could double). An empty `drop_reason` means the sample is kept.

Only the CLIP-score and encoder actors import torch (inside their methods): every Ray worker process
that reads, decodes or deduplicates imports this module, and torch + torchvision would cost each
of them ~3 s of CPU.
"""

import json
import threading
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from data_prep.config import ClipScoreConfig, DedupConfig, EncodeConfig, FilterConfig, PrepConfig, SourceConfig
from data_prep.decode import DecodeError, decode_image
from data_prep.filters import check_rules
from data_prep.hashing import Deduplicator, content_hash, perceptual_hash
from data_prep.sources import reader_for
from data_prep.transforms import training_pixels
from latent_cache.spec import TENSOR_DTYPES
from latent_cache.writer import ENCODERS_COLUMN, KEEP, binary_buffers, encoder_identity

DECODE_BATCH = 64  # samples per decode task, and rows per block from there to the encoders
# Blocks a CPU encoder actor runs at a time: their jobs share its one thread pool, so no job thread
# waits at the end of a block while the next one is fetched, unpacked and packed.
CPU_ENCODER_CALLS = 2


# -- read -------------------------------------------------------------------------------------

def read_shard(row: dict, source: SourceConfig, fs: pafs.FileSystem | None) -> Iterator[dict]:
    """One source shard -> its raw samples (dropped ones included, with their reason), streamed: a
    web shard of 10,000 images is ~1 GB of encoded bytes, and Ray Data cuts the rows into blocks as
    they come, so a read task never holds the whole shard.

    `fs` is the filesystem the shards were listed with (None for Twemoji): a task that built its own
    from the URL would take the worker's default S3 region, not the one the listing found."""
    for sample in reader_for(source).iter_shard(row["shard_url"], fs, row["path"]):
        sample = dict(sample)
        sample["caption"] = sample.get("caption") or ""
        sample["drop_reason"] = sample.get("drop_reason") or KEEP
        yield sample


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

class Deduplicate:
    """Drops exact and near duplicates, within the run and against the cache. One actor sees every
    sample in order, so the first of a group of duplicates is the one kept, run after run."""

    def __init__(self, cfg: DedupConfig, known: list[tuple[str, int | None]]):
        self.enabled = cfg.exact or cfg.near_max_distance is not None
        self.dedup = Deduplicator(cfg.near_max_distance, exact=cfg.exact) if self.enabled else None
        self.exact = cfg.exact
        if self.enabled:
            self.dedup.preload(known)

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

class Encode:
    """The frozen encoders on one device: semantic compressor (-> z_C), optionally Stage A, and the
    text conditioning (embeddings or tokens).

    A sample's latents must not depend on the samples the stream batched it with: a resumed run cuts
    the stream into batches elsewhere than an uninterrupted one, and must reproduce it bit for bit.
    On CPU, oneDNN's convolutions give an image results an fp16 ulp apart, now and then, in a batch
    of another size or at another position of a batch (they process the minibatch in blocks), and
    kernels may split work by thread count. So on CPU torch runs single-threaded and each image is
    one job: `cpus_per_encoder` threads take the jobs side by side (torch releases the GIL), the
    weights are shared, and a job's result is the same whichever thread runs it and whatever ran
    beside it. One image at a time on one thread is also the fastest way to run these networks on a
    CPU (the activations stay in cache). The text encoder (matmuls) gets jobs of exactly batch_size
    captions (the last one repeated), so that no kernel choice by batch size can differ. On CPU the
    actor also runs several calls at a time (`CPU_ENCODER_CALLS`): they queue their jobs on
    the one pool, and the shared tokenizer is called under a lock. On GPU the images are batched,
    padded the same way, on the device, one call at a time.
    """

    def __init__(self, cfg: EncodeConfig):
        import torch

        from latent_cache.encoders import build_encoders, encoder_fingerprints, fold_batchnorm
        from stages.latents import semantic_image_size

        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        self.tokenizer_lock = threading.Lock()
        self.pool = None
        if self.device.type == "cpu":
            from concurrent.futures import ThreadPoolExecutor

            torch.set_num_threads(1)  # one thread per job; the pool has as many as the CPUs the actor reserved
            self.pool = ThreadPoolExecutor(cfg.cpus_per_encoder, thread_name_prefix="encode")
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.precision]
        spec = cfg.spec()
        semantic, text, stage_a, decoder_text = build_encoders(spec)
        # The fingerprints of the encoders this actor really runs (weights as loaded on its node).
        self.identity = encoder_identity(encoder_fingerprints(spec, semantic, text, stage_a, decoder_text), text.width)
        self.semantic = fold_batchnorm(semantic).to(self.device)
        self.stage_a = fold_batchnorm(stage_a).to(self.device) if stage_a is not None else None
        self.text = text.to(self.device)
        self.decoder_text = decoder_text.to(self.device) if decoder_text is not None else None
        side = cfg.resolution
        # name -> (encoder, pixel column, side, images per call on GPU)
        self.image_encoders = {"stage_c_latents": (self.semantic, "semantic_pixels", semantic_image_size(side, side)[0], cfg.batch_size)}
        if self.stage_a is not None:
            self.image_encoders["stage_a_latents"] = (self.stage_a.encode, "pixels", side, min(cfg.stage_a_batch_size, cfg.batch_size))
        self.columns = spec.latent_columns + spec.text_columns + spec.decoder_text_columns
        self.keep_images, self.keep_semantic_images = spec.images, spec.semantic_images

    def images(self, buffers: tuple[np.ndarray, np.ndarray], rows: list[int], side: int):
        """The pixels of `rows` as a float tensor on the device, from the (offsets, data) buffers of a
        binary column (side x side x 3 bytes per row)."""
        import torch

        offsets, data = buffers
        arrays = np.stack([data[offsets[i] : offsets[i] + side * side * 3] for i in rows]).reshape(-1, side, side, 3)
        tensor = torch.from_numpy(arrays).to(self.device).permute(0, 3, 1, 2)
        return tensor.float().div_(255.0)

    def _image_encoders(self, batch: pa.Table) -> list[tuple[str, object, tuple, int, int]]:
        """(latent name, encoder, buffers of its pixel column in `batch`, side, images per call on GPU)."""
        return [(name, encoder, binary_buffers(batch.column(column)), side, per_call)
                for name, (encoder, column, side, per_call) in self.image_encoders.items()]

    def _text(self, captions: list[str]) -> dict:
        """The text conditioning of at most batch_size captions, computed on exactly batch_size."""
        import torch

        n = len(captions)
        padded = captions + [captions[-1]] * (self.cfg.batch_size - n)
        with self.tokenizer_lock:  # a Rust tokenizer may refuse calls from two threads at once
            ids, mask = self.text.tokenize(padded)
            decoder_ids, decoder_mask = self.decoder_text.tokenize(padded) if self.decoder_text is not None else (None, None)
        out = {}
        with torch.no_grad(), self._autocast():
            if self.cfg.text_mode == "embeddings":
                out["text_embeddings"] = self.text(ids, mask).float()[:n]
            else:
                out.update(text_tokens=ids[:n], text_mask=mask[:n])
            if self.decoder_text is not None:
                out["decoder_text_embeddings"] = self.decoder_text(decoder_ids, decoder_mask).float()[:n]
        return out

    def _autocast(self):
        import torch

        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.device.type == "cuda" and self.dtype != torch.float32)

    def _encode_on_cpu(self, batch: pa.Table, kept: list[int]) -> dict:
        """Every kept row's latents: one job per image and per batch_size captions, on the pool."""
        import torch

        def encode_one(encoder, buffers: tuple, side: int, row: int):
            with torch.no_grad():
                return encoder(self.images(buffers, [row], side))

        captions = [str(c) for c in batch.column("caption").take(kept).to_pylist()]
        size = self.cfg.batch_size
        # The text jobs are the largest: queued first, they do not end up alone at the end of the batch.
        text_jobs = [self.pool.submit(self._text, captions[i : i + size]) for i in range(0, len(kept), size)]
        image_jobs = {
            name: [self.pool.submit(encode_one, encoder, buffers, side, row) for row in kept]
            for name, encoder, buffers, side, _ in self._image_encoders(batch)
        }
        latents = {name: torch.cat([job.result() for job in jobs]) for name, jobs in image_jobs.items()}
        for name in text_jobs[0].result():
            latents[name] = torch.cat([job.result()[name] for job in text_jobs])
        return latents

    def _encode_on_gpu(self, batch: pa.Table, kept: list[int]) -> dict:
        """Every kept row's latents, in device batches of exactly batch_size rows (the last padded)."""
        import torch

        parts = []
        captions = [str(c) for c in batch.column("caption").take(kept).to_pylist()]
        encoders = self._image_encoders(batch)
        for first in range(0, len(kept), self.cfg.batch_size):
            rows = kept[first : first + self.cfg.batch_size]
            padded = rows + [rows[-1]] * (self.cfg.batch_size - len(rows))
            with torch.no_grad(), self._autocast():
                # Parts of a fixed size whatever the batch: a padded batch is cut the same way every time.
                part = {name: torch.cat([encoder(self.images(buffers, padded[i : i + per_call], side))
                                         for i in range(0, len(padded), per_call)])[: len(rows)].float()
                        for name, encoder, buffers, side, per_call in encoders}
            part.update(self._text(captions[first : first + len(rows)]))
            parts.append(part)
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Takes and returns Arrow tables (batch_format="pyarrow"): the pixels are read from the
        Arrow buffers, the pixel columns are dropped, and each latent column is a binary column
        built from one array (raw little-endian bytes per kept row, empty for a dropped row)."""
        from stages.latents import semantic_to_stage_c

        n = batch.num_rows
        kept = np.flatnonzero(pc.equal(batch.column("drop_reason"), KEEP).to_numpy(zero_copy_only=False)).tolist()
        latents = {}
        if kept:
            latents = (self._encode_on_cpu if self.pool is not None else self._encode_on_gpu)(batch, kept)
            latents["stage_c_latents"] = semantic_to_stage_c(latents["stage_c_latents"].float())
        if self.keep_images:  # the full-resolution pixels are the images column (raw HWC bytes per row)
            batch = batch.append_column("images", batch.column("pixels").cast(pa.large_binary()))
        if self.keep_semantic_images:  # and the compressor's input, as it was encoded
            batch = batch.append_column("semantic_images", batch.column("semantic_pixels").cast(pa.large_binary()))
        batch = batch.drop_columns(["pixels", "semantic_pixels"])
        for name in self.columns:
            data = np.ascontiguousarray(latents[name].cpu().numpy().astype(TENSOR_DTYPES[name])) if kept else np.zeros(0, np.uint8)
            sizes = np.zeros(n, np.int64)
            sizes[kept] = data.nbytes // max(len(kept), 1)
            offsets = np.concatenate([[0], np.cumsum(sizes)])
            column = pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
            batch = batch.append_column(name, column)
        identity = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([self.identity], pa.string()))
        return batch.append_column(ENCODERS_COLUMN, identity)


# -- the line ------------------------------------------------------------------------------------

def prep_dataset(cfg: PrepConfig, source_fs, pending: list[tuple[str, str]], known: list):
    """read -> decode + filter -> (CLIP score) -> deduplicate -> encode, over every pending shard in
    one streaming execution: the actors start once per run. The read tasks get `source_fs`, the
    filesystem of the listing (pickled with its S3 region)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from stages.latents import semantic_image_size

    res = cfg.encode.resolution
    ds = ray.data.from_items([{"shard_url": u, "path": p} for u, p in pending], override_num_blocks=len(pending))
    ds = ds.flat_map(read_shard, fn_kwargs={"source": cfg.source, "fs": source_fs})
    full_pixels = cfg.encode.stage_a is not None or cfg.encode.images or cfg.filters.clip_score is not None
    sizes = {"resolution": res if full_pixels else None, "semantic_size": semantic_image_size(res, res)}
    ds = ds.map_batches(decode_and_filter, fn_kwargs={"filters": cfg.filters, **sizes}, batch_size=DECODE_BATCH)
    if cfg.filters.clip_score is not None:
        ds = ds.map_batches(
            ClipScoreFilter, fn_constructor_kwargs={"cfg": cfg.filters.clip_score, "resolution": res},
            compute=ActorPoolStrategy(size=1), batch_size=cfg.filters.clip_score.batch_size, num_cpus=1,
        )
    # Blocks of DECODE_BATCH rows from here on: the encoder actors get work in units of a second or
    # two, so that at the end of the stream none waits long for another to finish a large block.
    ds = ds.map_batches(
        Deduplicate, fn_constructor_kwargs={"cfg": cfg.filters.dedup, "known": known},
        compute=ActorPoolStrategy(size=1), batch_size=DECODE_BATCH, num_cpus=0.25, batch_format="pyarrow",
    )
    concurrent = {}
    if not cfg.encode.use_gpu:
        concurrent = {"max_concurrent_calls_per_actor": CPU_ENCODER_CALLS, "enable_true_multi_threading": True}
    return ds.map_batches(
        Encode, fn_constructor_kwargs={"cfg": cfg.encode},
        compute=ActorPoolStrategy(size=cfg.encode.num_encoders, **concurrent),
        batch_size=cfg.encode.batch_size, num_gpus=1 if cfg.encode.use_gpu else 0, num_cpus=cfg.encode.cpus_per_encoder,
        batch_format="pyarrow",
    )
