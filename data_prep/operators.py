"""The Ray Data operators of data prep, and the line they form (`prep_dataset`): read -> decode +
filter -> (CLIP score) -> deduplicate -> encode, into the cache's writer (`latent_cache.writer`).

Between the operators a sample carries its encoded image bytes, not decoded pixels: at the v2 sizes
the two squares the encoders take are 4.9 MB an image, its JPEG a tenth of that or less. The decode
tasks decode each image to check it (header, size and aspect rules, a corrupt image dropped with its
reason) and to hash it for deduplication; the encoder actor (and the CLIP-score actor) decode it
again, with the same function, and cut it into the squares they take.

A dropped sample is not removed until the writer: it flows on with its `drop_reason` set and no
image bytes, so that every drop is counted exactly once, from the data itself (no side counters that
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
from data_prep.transforms import center_crop_resize, training_pixels
from latent_cache.buckets import nearest as nearest_bucket
from latent_cache.buckets import parse as parse_bucket
from latent_cache.spec import TENSOR_DTYPES
from latent_cache.writer import ENCODERS_COLUMN, KEEP, encoder_identity

DECODE_BATCH = 64  # samples per decode task, and rows per block from there to the encoders
# Blocks an encoder actor runs at a time. Their jobs share its one thread pool: on CPU no job thread
# waits at the end of a block while the next one is fetched, unpacked and packed; on GPU the threads
# decode one block's images while the device encodes the other's.
ENCODER_CALLS = 2


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

def _decode_one(sample: dict, filters: FilterConfig) -> dict:
    out = {
        "key": sample["key"], "caption": sample["caption"], "source_shard": sample["source_shard"],
        "metadata": sample.get("metadata") or "{}", "width": 0, "height": 0, "content_hash": "", "phash": 0,
        "clip_score": float("nan"), "drop_reason": sample["drop_reason"], "image_bytes": b"",
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
    out["image_bytes"] = data
    return out


def decode_and_filter(batch: dict, filters: FilterConfig) -> dict:
    """Decodes every kept sample, applies the size / aspect / caption / metadata rules and hashes
    it; a sample that passes goes on with its encoded bytes (`image_bytes`)."""
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    rows = [_decode_one({k: batch[k][i] for k in keys}, filters) for i in range(n)]
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
    """LAION-style CLIP filter: cosine similarity of the normalised image and caption embeddings,
    the image taken as the centre square at the training resolution (what Stage A encodes)."""

    def __init__(self, cfg: ClipScoreConfig, resolution: int, max_pixels: int):
        self.cfg, self.resolution, self.max_pixels = cfg, resolution, max_pixels
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
            decoded = (decode_image(batch["image_bytes"][i], self.max_pixels) for i in kept)
            images = [np.asarray(center_crop_resize(image, self.resolution)) for image in decoded]
            scores = self.scores(images, [str(batch["caption"][i]) for i in kept])
            batch["clip_score"] = np.array(batch["clip_score"], dtype=np.float32)
            for i, score in zip(kept, scores):
                batch["clip_score"][i] = score
                if score < self.cfg.min:
                    batch["drop_reason"][i] = "clip_score"
                    batch["image_bytes"][i] = b""
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
        """Takes and returns Arrow tables (batch_format="pyarrow"): the image bytes pass through
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
        no_bytes = pa.scalar(b"", batch.schema.field("image_bytes").type)
        columns = {
            "drop_reason": pa.array(reasons, batch.schema.field("drop_reason").type),
            "image_bytes": pc.if_else(dropped, no_bytes, batch.column("image_bytes")),
        }
        for name, column in columns.items():
            batch = batch.set_column(batch.schema.get_field_index(name), name, column)
        return batch


# -- encode ------------------------------------------------------------------------------------

def _per_row(n: int, kept: list[int], tensors: np.ndarray | list[np.ndarray]) -> pa.Array:
    """A large_binary column of `n` rows: each kept row's tensor (in the rows' order: one array of
    them all, or with aspect-ratio buckets a list, their shapes differing) as raw bytes, empty for
    the other rows."""
    sizes = np.zeros(n, np.int64)
    if isinstance(tensors, np.ndarray):  # one bucket: the array's own bytes, not copied
        data = np.ascontiguousarray(tensors)
        sizes[kept] = data.nbytes // max(len(kept), 1)
    else:
        sizes[kept] = [t.nbytes for t in tensors]
        data = np.concatenate([np.ascontiguousarray(t).reshape(-1).view(np.uint8) for t in tensors]) if tensors else np.zeros(0, np.uint8)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


class Encode:
    """The frozen encoders on one device: semantic compressor (-> z_C), optionally Stage A, and the
    text conditioning (embeddings or tokens). The kept samples come as their encoded image bytes:
    the actor's CPU threads (`cpus_per_encoder`) decode them and cut the squares the encoders take.

    A sample's latents must not depend on the samples the stream batched it with: a resumed run cuts
    the stream into batches elsewhere than an uninterrupted one, and must reproduce it bit for bit.
    On CPU, oneDNN's convolutions give an image results an fp16 ulp apart, now and then, in a batch
    of another size or at another position of a batch (they process the minibatch in blocks), and
    kernels may split work by thread count. So on CPU torch runs single-threaded and each image is
    one job, decoded, cut and encoded by one of `cpus_per_encoder` threads side by side (PIL and
    torch release the GIL); the weights are shared, and a job's result is the same whichever thread
    runs it and whatever ran beside it. One image at a time on one thread is also the fastest way to
    run these networks on a CPU (the activations stay in cache). The text encoder (matmuls) gets jobs
    of exactly batch_size captions (the last one repeated), so that no kernel choice by batch size
    can differ. The actor runs several calls at a time (`ENCODER_CALLS`): they queue their jobs on
    the one pool, and the shared tokenizer is called under a lock.

    On GPU the images are batched, padded the same way. The threads decode and cut a batch's images
    into host buffers (pinned, so that the copies to the device do not wait) while the device
    encodes the batch before it, of the same call or of the other call the actor runs meanwhile;
    one call at a time holds the device.
    """

    def __init__(self, cfg: EncodeConfig, max_pixels: int):
        from concurrent.futures import ThreadPoolExecutor

        import torch

        from latent_cache.encoders import build_encoders, encoder_fingerprints, fold_batchnorm
        from stages.latents import semantic_image_size

        self.cfg, self.max_pixels = cfg, max_pixels  # max_pixels: the decode tasks' bound (filters.max_pixels)
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        self.per_image_jobs = self.device.type == "cpu"
        if self.per_image_jobs:
            torch.set_num_threads(1)  # one thread per job; the pool has as many as the CPUs the actor reserved
        self.pool = ThreadPoolExecutor(cfg.cpus_per_encoder, thread_name_prefix="encode")
        self.tokenizer_lock = threading.Lock()
        self.device_lock = threading.Lock()
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.precision]
        spec = cfg.spec()
        semantic, text, stage_a, decoder_text = build_encoders(spec)
        # The fingerprints of the encoders this actor really runs (weights as loaded on its node).
        self.identity = encoder_identity(encoder_fingerprints(spec, semantic, text, stage_a, decoder_text), text.width)
        self.semantic = fold_batchnorm(semantic).to(self.device)
        self.stage_a = fold_batchnorm(stage_a).to(self.device) if stage_a is not None else None
        self.text = text.to(self.device)
        self.decoder_text = decoder_text.to(self.device) if decoder_text is not None else None
        # bucket -> image -> its (height, width): the semantic compressor's input, and the image at
        # the training size when Stage A encodes it or the cache keeps it (latent_cache/buckets.py)
        self.buckets = spec.bucket_names
        self.sizes = {}
        for bucket in self.buckets:
            height, width = parse_bucket(bucket)
            self.sizes[bucket] = {"semantic_images": semantic_image_size(height, width)}
            if spec.stage_a is not None or spec.images:
                self.sizes[bucket]["images"] = (height, width)
        # latent name -> (encoder, the square it takes, images per call on GPU)
        self.image_encoders = {"stage_c_latents": (self.semantic, "semantic_images", cfg.batch_size)}
        if self.stage_a is not None:
            self.image_encoders["stage_a_latents"] = (self.stage_a.encode, "images", min(cfg.stage_a_batch_size, cfg.batch_size))
        self.columns = spec.latent_columns + spec.text_columns + spec.decoder_text_columns
        # The squares the cache keeps as the encoders took them (encode.images, encode.semantic_images).
        kept = {"images": spec.images, "semantic_images": spec.semantic_images}
        self.kept_squares = [name for name, keep in kept.items() if keep]

    def cut(self, image_bytes: bytes, bucket: str) -> dict[str, np.ndarray]:
        """One image's squares (a bucket's shapes), uint8 HWC RGB: decoded as the decode task decoded
        it (which checked that it decodes, within the same pixel bound) and cut by `training_pixels`."""
        sizes = self.sizes[bucket]
        image = decode_image(image_bytes, max_pixels=self.max_pixels)
        full, semantic = training_pixels(image, sizes.get("images"), sizes["semantic_images"])
        return {"semantic_images": semantic} if full is None else {"images": full, "semantic_images": semantic}

    @staticmethod
    def _as_float(pixels):
        """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1], where the pixels are."""
        return pixels.permute(0, 3, 1, 2).float().div_(255.0)

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

    def _encode_per_image(self, images: list[bytes], captions: list[str], bucket: str) -> tuple[dict, dict]:
        """(latents, kept squares) of the rows of a bucket: one job per image (decode, cut, every
        image encoder) and per batch_size captions, on the pool."""
        import torch

        def encode_one(image_bytes: bytes):
            squares = self.cut(image_bytes, bucket)
            with torch.no_grad():
                # A writable batch of one with a batch's strides: CPU kernels pick their path by
                # strides too, and PIL's arrays are read-only.
                latents = {name: encoder(self._as_float(torch.from_numpy(np.stack([squares[square]]))))
                           for name, (encoder, square, _) in self.image_encoders.items()}
            return squares, latents

        size = self.cfg.batch_size
        # The text jobs are the largest: queued first, they do not end up alone at the end of the batch.
        text_jobs = [self.pool.submit(self._text, captions[i : i + size]) for i in range(0, len(captions), size)]
        done = [job.result() for job in [self.pool.submit(encode_one, data) for data in images]]
        latents = {name: torch.cat([one[name] for _, one in done]) for name in self.image_encoders}
        for name in text_jobs[0].result():
            latents[name] = torch.cat([job.result()[name] for job in text_jobs])
        return latents, {name: np.stack([squares[name] for squares, _ in done]) for name in self.kept_squares}

    def _fill(self, images: list[bytes], bucket: str) -> tuple[dict, list]:
        """Host buffers of batch_size rows for each square of a bucket (pinned on CUDA), and the
        pool's jobs that decode and cut `images` into their first rows."""
        import torch

        pinned = self.device.type == "cuda"
        buffers = {name: torch.empty((self.cfg.batch_size, *size, 3), dtype=torch.uint8, pin_memory=pinned)
                   for name, size in self.sizes[bucket].items()}

        def fill(row: int, image_bytes: bytes) -> None:
            for name, square in self.cut(image_bytes, bucket).items():
                buffers[name].numpy()[row] = square

        return buffers, [self.pool.submit(fill, row, data) for row, data in enumerate(images)]

    def encode_batch(self, squares: dict, captions: list[str]) -> dict:
        """The latents of one device batch: `squares` holds each square of batch_size images on the
        host, uint8 (batch_size, side, side, 3); the latents are those of its first len(captions) rows."""
        import torch

        n = len(captions)
        pixels = {name: buffer.to(self.device, non_blocking=True) for name, buffer in squares.items()}
        with torch.no_grad(), self._autocast():
            # Parts of a fixed size whatever the batch: a padded batch is cut the same way every time.
            part = {name: torch.cat([encoder(self._as_float(pixels[square][i : i + per_call]))
                                     for i in range(0, self.cfg.batch_size, per_call)])[:n].float()
                    for name, (encoder, square, per_call) in self.image_encoders.items()}
        part.update(self._text(captions))
        return part

    def _encode_on_device(self, images: list[bytes], captions: list[str], bucket: str) -> tuple[dict, dict]:
        """(latents, kept squares) of the rows of a bucket, in device batches of exactly batch_size
        rows (the last padded with its last image); the pool fills the next batch's buffers meanwhile."""
        import torch

        size = self.cfg.batch_size
        parts, kept = [], {name: [] for name in self.kept_squares}
        filling = self._fill(images[:size], bucket)
        for first in range(0, len(images), size):
            buffers, jobs = filling
            if first + size < len(images):
                filling = self._fill(images[first + size : first + 2 * size], bucket)
            for job in jobs:
                job.result()
            n = min(size, len(images) - first)
            for buffer in buffers.values():
                buffer[n:] = buffer[n - 1]
            with self.device_lock:
                parts.append(self.encode_batch(buffers, captions[first : first + n]))
            for name in self.kept_squares:
                kept[name].append(buffers[name][:n].numpy())
        latents = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        return latents, {name: np.concatenate(arrays) for name, arrays in kept.items()}

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Takes and returns Arrow tables (batch_format="pyarrow"): the image bytes column is
        replaced by the latent columns (and the squares the cache keeps), each a binary column built
        from one array (raw little-endian bytes per kept row, empty for a dropped row)."""
        from stages.latents import semantic_to_stage_c

        n = batch.num_rows
        kept = np.flatnonzero(pc.equal(batch.column("drop_reason"), KEEP).to_numpy(zero_copy_only=False)).tolist()
        # kept row -> its bucket, by the source image's aspect ratio
        if len(self.buckets) > 1:
            heights, widths = (batch.column(name).take(kept).to_pylist() for name in ("height", "width"))
            row_buckets = [nearest_bucket(self.buckets, h, w) for h, w in zip(heights, widths)]
        else:
            row_buckets = self.buckets * len(kept)
        groups = {}  # bucket -> positions in `kept`, in order
        for position, bucket in enumerate(row_buckets):
            groups.setdefault(bucket, []).append(position)
        rows = {name: [None] * len(kept) for name in self.kept_squares + self.columns}  # each kept row's tensor
        images = batch.column("image_bytes").take(kept).to_pylist() if kept else []
        captions = [str(c) for c in batch.column("caption").take(kept).to_pylist()] if kept else []
        encode = self._encode_per_image if self.per_image_jobs else self._encode_on_device
        for bucket, positions in groups.items():
            latents, arrays = encode([images[i] for i in positions], [captions[i] for i in positions], bucket)
            latents["stage_c_latents"] = semantic_to_stage_c(latents["stage_c_latents"].float())
            arrays.update({name: latents[name].cpu().numpy().astype(TENSOR_DTYPES[name]) for name in self.columns})
            if len(groups) == 1:  # one bucket: the arrays as they are, in the rows' order
                rows = arrays
                break
            for name, array in arrays.items():
                for j, position in enumerate(positions):
                    rows[name][position] = array[j]
        batch = batch.drop_columns(["image_bytes"])
        for name in self.kept_squares + self.columns:
            batch = batch.append_column(name, _per_row(n, kept, rows[name]))
        if len(self.buckets) > 1:
            names = [""] * n
            for i, bucket in zip(kept, row_buckets):
                names[i] = bucket
            batch = batch.append_column("bucket", pa.array(names, pa.string()))
        identity = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([self.identity], pa.string()))
        return batch.append_column(ENCODERS_COLUMN, identity)


# -- the line ------------------------------------------------------------------------------------

def prep_dataset(cfg: PrepConfig, source_fs, pending: list[tuple[str, str]], known: list):
    """read -> decode + filter -> (CLIP score) -> deduplicate -> encode, over every pending shard in
    one streaming execution: the actors start once per run. The read tasks get `source_fs`, the
    filesystem of the listing (pickled with its S3 region)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    max_pixels = cfg.filters.max_pixels
    ds = ray.data.from_items([{"shard_url": u, "path": p} for u, p in pending], override_num_blocks=len(pending))
    ds = ds.flat_map(read_shard, fn_kwargs={"source": cfg.source, "fs": source_fs})
    ds = ds.map_batches(decode_and_filter, fn_kwargs={"filters": cfg.filters}, batch_size=DECODE_BATCH)
    if cfg.filters.clip_score is not None:
        clip = {"cfg": cfg.filters.clip_score, "resolution": cfg.encode.resolution, "max_pixels": max_pixels}
        ds = ds.map_batches(
            ClipScoreFilter, fn_constructor_kwargs=clip,
            compute=ActorPoolStrategy(size=1), batch_size=cfg.filters.clip_score.batch_size, num_cpus=1,
        )
    # Blocks of DECODE_BATCH rows from here on: the encoder actors get work in units of a second or
    # two, so that at the end of the stream none waits long for another to finish a large block.
    ds = ds.map_batches(
        Deduplicate, fn_constructor_kwargs={"cfg": cfg.filters.dedup, "known": known},
        compute=ActorPoolStrategy(size=1), batch_size=DECODE_BATCH, num_cpus=0.25, batch_format="pyarrow",
    )
    return ds.map_batches(
        Encode, fn_constructor_kwargs={"cfg": cfg.encode, "max_pixels": max_pixels},
        compute=ActorPoolStrategy(size=cfg.encode.num_encoders, max_concurrent_calls_per_actor=ENCODER_CALLS,
                                  enable_true_multi_threading=True),
        batch_size=cfg.encode.batch_size, num_gpus=1 if cfg.encode.use_gpu else 0, num_cpus=cfg.encode.cpus_per_encoder,
        batch_format="pyarrow",
    )
