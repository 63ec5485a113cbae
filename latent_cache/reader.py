"""A committed cache, read with plain pyarrow or as a Ray Dataset, and its held-out split: a row is
held out for validation by a hash of its key alone."""

import itertools
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.storage import join, resolve
from latent_cache import manifest as manifests
from latent_cache.spec import TEXT_COLUMNS

# 1 / this is the granularity of the held-out fraction (and of other fractions drawn by key hash).
SPLIT_BUCKETS = 10_000


class Cache:
    """A committed cache: its manifest and files, read with plain pyarrow or as a Ray Dataset."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = resolve(url)
        manifest = manifests.read(self.fs, self.root)
        if manifest is None:
            raise FileNotFoundError(f"no cache at {url}: {manifests.MANIFEST} is missing (has data prep run and committed?)")
        self.manifest = manifest
        if manifest.get("schema_version") != manifests.SCHEMA_VERSION:
            raise manifests.CacheMismatchError(
                f"{url} has cache schema version {manifest.get('schema_version')}; this code reads version "
                f"{manifests.SCHEMA_VERSION}"
            )

    @property
    def files(self) -> list[str]:
        return [join(self.root, f["path"]) for f in self.manifest["files"]]

    @property
    def buckets(self) -> dict[str, dict]:
        """bucket ("HxW") -> {"shapes": its tensor shapes, "rows": its rows} (latent_cache/buckets.py)."""
        return manifests.buckets(self.manifest)

    def files_of(self, bucket: str | None = None) -> list[str]:
        """The files of a bucket's rows (a file holds one bucket); None: every file, which only a
        cache of one bucket (or a read of no tensor column) may take at once."""
        if bucket is None:
            return self.files
        if bucket not in self.buckets:
            raise ValueError(f"the cache at {self.url} has no bucket {bucket}: its buckets are {list(self.buckets)}")
        if "buckets" not in self.manifest:
            return self.files
        return [join(self.root, f["path"]) for f in self.manifest["files"] if f["bucket"] == bucket]

    def _check_one_shape(self, columns: list[str] | None, bucket: str | None) -> None:
        tensors = [c for c in (columns or self.manifest["shapes"]) if c in self.manifest["shapes"]]
        if bucket is None and len(self.buckets) > 1 and tensors:
            raise ValueError(f"the cache at {self.url} holds {len(self.buckets)} aspect-ratio buckets, whose tensor columns "
                             f"{tensors} have other shapes in each: read one bucket at a time (bucket=...)")

    @property
    def rows(self) -> int:
        return self.manifest["rows_written"]

    @property
    def text_columns(self) -> list[str]:
        """The columns of its text conditioning (by its text mode)."""
        return list(TEXT_COLUMNS[self.manifest["text_mode"]])

    def fingerprints(self) -> dict[str, str]:
        return manifests.fingerprints(self.manifest)

    def check_fingerprints(self, expected: dict[str, str]) -> None:
        """Refuses the cache when an encoder it was made with is not the one the caller uses."""
        manifests.check_fingerprints(self.manifest, expected, self.url)

    def check_columns(self, columns: list[str], purpose: str) -> None:
        """Refuses the cache when it lacks a tensor column of `columns` that `purpose` reads."""
        manifests.check_columns(self.manifest, columns, self.url, purpose)

    def read_table(self, columns: list[str] | None = None, bucket: str | None = None) -> pa.Table:
        """All rows (of a bucket) with plain pyarrow (no Ray)."""
        tables = list(self.file_tables(columns, bucket))
        return pa.concat_tables(tables) if tables else pa.table({})

    def file_tables(self, columns: list[str] | None = None, bucket: str | None = None):
        """The rows (of a bucket) a file at a time, in file order, with plain pyarrow."""
        self._check_one_shape(columns, bucket)
        for path in self.files_of(bucket):
            yield pq.read_table(path, columns=columns, filesystem=self.fs)

    def spread_rows(self, columns: list[str], count: int, fraction: float, validation: bool = False,
                    bucket: str | None = None) -> pa.Table:
        """`count` rows of one side of the split (the training rows, or with `validation`
        the held-out ones) spread evenly over the cache (or a bucket of it) in file order, with
        `columns`. Only the key column is read everywhere; the others only from the row groups that
        hold a chosen row."""
        self._check_one_shape(columns, bucket)
        where = []  # (file, row group, index in the group) of every row of the split
        for path in self.files_of(bucket):
            with self.fs.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                for group in range(parquet.metadata.num_row_groups):
                    keys = parquet.read_row_group(group, columns=["key"]).column("key").to_pylist()
                    where += [(path, group, i) for i, k in enumerate(keys) if is_validation(k, fraction) == validation]
        if not where:
            raise ValueError(f"the cache at {self.url} has no {'held-out' if validation else 'training'} rows "
                             f"at validation fraction {fraction}")
        picks = [where[int(i)] for i in np.linspace(0, len(where) - 1, min(count, len(where)))]
        parts = []
        for (path, group), members in itertools.groupby(picks, key=lambda w: w[:2]):
            with self.fs.open_input_file(path) as f:
                table = pq.ParquetFile(f).read_row_group(group, columns=columns)
            parts.append(table.take(pa.array([i for *_, i in members])))
        return pa.concat_tables(parts)

    def ray_dataset(self, columns: list[str] | None = None, bucket: str | None = None, **kwargs):
        import ray.data

        if not self.files:
            raise ValueError(f"the cache at {self.url} has no rows yet")
        self._check_one_shape(columns, bucket)
        # The files are known (the manifest lists them): the V1 reader plans from that list, while
        # the V2 one starts a pool of new footer-reading actor processes (up to 32) for every
        # execution, i.e. every epoch of every dataset; on a small node that costs more than the reading.
        # V1 samples a file or two here, behind a progress bar of its own: not for a job's console.
        context = ray.data.DataContext.get_current()
        saved = context.use_datasource_v2, context.enable_progress_bars
        context.use_datasource_v2, context.enable_progress_bars = False, False
        try:
            ds = ray.data.read_parquet(self.files_of(bucket), filesystem=self.fs, **kwargs)
        finally:
            context.use_datasource_v2, context.enable_progress_bars = saved
        return ds.select_columns(columns) if columns else ds


def existing_hashes(cache: Cache) -> list[tuple[str, int | None]]:
    """(content_hash, phash) of every committed row, for deduplication against the cache."""
    if not cache.files:
        return []
    table = cache.read_table(columns=["content_hash", "phash"])
    return list(zip(table.column("content_hash").to_pylist(), table.column("phash").to_pylist()))


def tensor_column(table: pa.Table, name: str, dtype=np.float32) -> np.ndarray:
    """A fixed-shape tensor column of a table read from the cache as one (N, *shape) array, of
    `dtype` (None: the stored one)."""
    array = np.concatenate([chunk.to_numpy_ndarray() for chunk in table.column(name).chunks])
    return array if dtype is None else array.astype(dtype)


def numpy_batches(table: pa.Table, batch_size: int) -> list[dict[str, np.ndarray]]:
    """A table of cache rows as numpy batches of `batch_size` rows (the last one shorter), as Ray
    Data's batch_format="numpy" hands them: tensor columns (N, *shape) in their stored dtype, the
    others 1-D arrays."""
    return [numpy_columns(table.slice(start, batch_size)) for start in range(0, table.num_rows, batch_size)]


def numpy_columns(table: pa.Table) -> dict[str, np.ndarray]:
    """A table of cache rows as one numpy batch (see numpy_batches)."""
    def array(name: str) -> np.ndarray:
        if isinstance(table.schema.field(name).type, pa.FixedShapeTensorType):
            return tensor_column(table, name, dtype=None)
        return table.column(name).to_numpy()

    return {name: array(name) for name in table.column_names}


def is_validation(key: str, fraction: float) -> bool:
    """Whether a row is held out: decided by a hash of its key alone, so the split is the same in
    every run, whatever the order or the number of workers."""
    return zlib.crc32(key.encode()) % SPLIT_BUCKETS < fraction * SPLIT_BUCKETS


def split(batch: pa.Table, fraction: float, validation: bool) -> pa.Table:
    """The held-out rows of a batch (`validation`), or the others."""
    mask = [is_validation(k, fraction) == validation for k in batch.column("key").to_pylist()]
    return batch.filter(pa.array(mask, pa.bool_()))
