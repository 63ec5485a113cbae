"""The latent cache: parquet files of fixed-shape fp16 tensors plus `manifest.json`, local or on S3.

Layout:
    <cache>/manifest.json                      the commit point: only files it lists are part of the cache
    <cache>/data/wave-<id>/<name>.parquet      written by one wave of source shards

Tensor columns use Arrow's canonical `arrow.fixed_shape_tensor` extension type, so plain pyarrow (or
any Arrow reader) recovers each tensor's shape; Ray reads them as tensors. Columns:
    key, caption, source_shard (str); width, height (int32, the source image); metadata (JSON str);
    content_hash (str), phash (uint64), clip_score (float32, NaN when not computed); bucket (str "HxW");
    stage_c_latents  float16 [16, h, w]   z_C = (e + 1) / 42, what Stage C learns
    stage_a_latents  float16 [4, H/4, W/4] Stage A encoder output (optional, for Stage B)
    text_embeddings  float16 [77, width]   (text_mode "embeddings")
    text_tokens int32 [77] + text_mask int8 [77]   (text_mode "tokens")
"""

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.storage import join, read_text, resolve

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TENSOR_DTYPES = {
    "stage_c_latents": np.float16,
    "stage_a_latents": np.float16,
    "text_embeddings": np.float16,
    "text_tokens": np.int32,
    "text_mask": np.int8,
}


# The columns whose repeated values a parquet dictionary shrinks (the others are numbers and tensors).
DICTIONARY_COLUMNS = ("key", "caption", "source_shard", "metadata", "bucket")


class CacheMismatchError(ValueError):
    """A cache made by other encoders (or settings) than the ones it is used with."""


def new_manifest(settings: dict, encoders: dict, shapes: dict) -> dict:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "schema_version": SCHEMA_VERSION,
        "created_at": now,
        "updated_at": now,
        **settings,
        "shapes": shapes,
        "encoders": encoders,
        "shards": {},
        "files": [],
        "rows_in": 0,
        "rows_written": 0,
        "dropped": {},
    }


def record_wave(manifest: dict, shard_stats: dict[str, dict], files: list[dict]) -> dict:
    """Adds a committed wave: its shards' counts and its files."""
    for shard, stats in shard_stats.items():
        manifest["shards"][shard] = stats
        manifest["rows_in"] += stats["rows_in"]
        manifest["rows_written"] += stats["rows_written"]
        for reason, count in stats["dropped"].items():
            manifest["dropped"][reason] = manifest["dropped"].get(reason, 0) + count
    manifest["files"].extend(files)
    manifest["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return manifest


def binary_buffers(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, data) of a binary or large_binary Arrow column, as numpy views of its buffers: row i
    is data[offsets[i]:offsets[i + 1]]."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offset_type = np.int64 if pa.types.is_large_binary(array.type) else np.int32
    _, offsets, data = array.buffers()
    offsets = np.frombuffer(offsets, offset_type)[array.offset : array.offset + len(array) + 1]
    return offsets, np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)


def tensor_column(column: pa.Array | pa.ChunkedArray, shape: tuple[int, ...], dtype) -> pa.FixedShapeTensorArray:
    """A binary column of raw little-endian tensors, one per row -> a canonical fixed-shape tensor column."""
    offsets, data = binary_buffers(column)
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if (np.diff(offsets) != size).any():
        raise ValueError(f"every row must hold one {np.dtype(dtype)} tensor of shape {tuple(shape)} ({size} bytes)")
    flat = np.frombuffer(data, dtype, count=(len(offsets) - 1) * size // np.dtype(dtype).itemsize, offset=int(offsets[0]))
    return pa.FixedShapeTensorArray.from_numpy_ndarray(flat.reshape(len(offsets) - 1, *shape))


class Cache:
    """A committed cache: its manifest and files, read with plain pyarrow or as a Ray Dataset."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = resolve(url)
        text = read_text(self.fs, join(self.root, MANIFEST))
        if text is None:
            raise FileNotFoundError(f"no cache at {url}: {MANIFEST} is missing (has data prep run and committed?)")
        self.manifest = json.loads(text)
        if self.manifest.get("schema_version") != SCHEMA_VERSION:
            raise CacheMismatchError(
                f"{url} has cache schema version {self.manifest.get('schema_version')}; this code reads version {SCHEMA_VERSION}"
            )

    @property
    def files(self) -> list[str]:
        return [join(self.root, f["path"]) for f in self.manifest["files"]]

    @property
    def rows(self) -> int:
        return self.manifest["rows_written"]

    def fingerprints(self) -> dict[str, str]:
        return {name: info["fingerprint"] for name, info in self.manifest["encoders"].items()}

    def check_fingerprints(self, expected: dict[str, str]) -> None:
        """Refuses the cache when an encoder it was made with is not the one the caller uses."""
        ours = self.fingerprints()
        for name, fingerprint in expected.items():
            if name not in ours:
                raise CacheMismatchError(
                    f"the cache at {self.url} has no {name} latents (it was made with encoders {sorted(ours)})"
                )
            if ours[name] != fingerprint:
                raise CacheMismatchError(
                    f"the cache at {self.url} was made with a {name} of fingerprint {ours[name]} "
                    f"({self.manifest['encoders'][name].get('weights')}), but this run's {name} has fingerprint "
                    f"{fingerprint}. Re-run data prep with this {name}, or point the run at its matching cache."
                )

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """All rows with plain pyarrow (no Ray)."""
        tables = [pq.read_table(path, columns=columns, filesystem=self.fs) for path in self.files]
        return pa.concat_tables(tables) if tables else pa.table({})

    def ray_dataset(self, columns: list[str] | None = None, **kwargs):
        import ray.data

        if not self.files:
            raise ValueError(f"the cache at {self.url} has no rows yet")
        ds = ray.data.read_parquet(self.files, filesystem=self.fs, **kwargs)
        return ds.select_columns(columns) if columns else ds


def existing_hashes(cache: Cache) -> list[tuple[str, int | None]]:
    """(content_hash, phash) of every committed row, for deduplication against the cache."""
    if not cache.files:
        return []
    table = cache.read_table(columns=["content_hash", "phash"])
    return list(zip(table.column("content_hash").to_pylist(), table.column("phash").to_pylist()))
