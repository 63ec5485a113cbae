"""img2dataset parquet: an image bytes column, a caption column, and other columns kept as metadata."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data_prep.decode import DropReason
from data_prep.sources.listing import list_shards, shard_files
from data_prep.sources.samples import ShardSchemaError, raw_sample, salvaged, try_caption

log = logging.getLogger(__name__)

SUFFIXES = (".parquet",)
PARQUET_IMAGE_COLUMNS = ("jpg", "png", "webp", "image", "image_bytes")  # auto-detected, in this order


@dataclass(frozen=True)
class ParquetReader:
    """The shards of a source: its parquet files, read with these columns."""

    image_column: str | None = None  # None: the first of PARQUET_IMAGE_COLUMNS present
    caption_column: str = "caption"

    @staticmethod
    def options(source) -> dict:
        return {"image_column": source.image_column, "caption_column": source.caption_column}

    def list_shards(self, source_url: str) -> tuple[pafs.FileSystem, list[tuple[str, str]]]:
        return list_shards(source_url, "parquet", shard_files(SUFFIXES))

    def iter_shard(self, url: str, fs: pafs.FileSystem, path: str) -> Iterator[dict]:
        return salvaged(iter_parquet_shard(url, fs, path, self.image_column, self.caption_column), url, path)


@dataclass(frozen=True)
class _ParquetColumns:
    image: str
    caption: str
    key: str | None  # None: keys are the row index
    metadata: tuple[str, ...]

    @classmethod
    def resolve(cls, schema: pa.Schema, path: str, image: str | None, caption: str, key: str) -> _ParquetColumns:
        names = schema.names
        image = _find_image_column(schema, path, image)
        if caption not in names:
            raise ShardSchemaError(f"{path}: no caption column {caption!r}; its columns are {names}")
        used = {image, caption, key}
        metadata = tuple(n for n in names if n not in used and not _is_binary_like(schema.field(n).type))
        return cls(image, caption, key if key in names else None, metadata)


def _find_image_column(schema: pa.Schema, path: str, requested: str | None) -> str:
    """The requested column; when the default ("jpg") or None was asked for and is absent, the first
    of PARQUET_IMAGE_COLUMNS present. An explicit other name is never silently replaced."""
    names = schema.names
    if requested in names:
        column = requested
    elif requested not in (None, PARQUET_IMAGE_COLUMNS[0]):
        raise ShardSchemaError(f"{path}: no image column {requested!r}; its columns are {names}")
    else:
        found = [name for name in PARQUET_IMAGE_COLUMNS if name in names]
        if not found:
            raise ShardSchemaError(
                f"{path}: no image column (looked for {list(PARQUET_IMAGE_COLUMNS)}); its columns are {names}"
            )
        column = found[0]
    if not _is_binary_like(schema.field(column).type):
        raise ShardSchemaError(f"{path}: image column {column!r} has type {schema.field(column).type}, not binary")
    return column


def _is_binary_like(dtype: pa.DataType) -> bool:
    """Binary columns, and the Hugging Face `Image` struct {bytes, path}. They are images, kept out
    of the JSON metadata (a second image as JSON text would only bloat every row)."""
    if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype) or pa.types.is_binary_view(dtype):
        return True
    return pa.types.is_struct(dtype) and dtype.get_field_index("bytes") >= 0


def _image_values(batch: pa.RecordBatch, column: str) -> list[bytes | None]:
    array = batch.column(column)
    if pa.types.is_struct(array.type):  # Hugging Face Image feature: {bytes, path}
        array = array.field("bytes")
    return array.to_pylist()


def _json_safe(value):
    """NaN/inf -> null (JSON has no NaN), recursively; other values as pyarrow gives them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def iter_parquet_shard(
    url: str,
    fs: pafs.FileSystem,
    path: str,
    image_column: str | None = "jpg",
    caption_column: str = "caption",
    key_column: str = "key",
    batch_size: int = 256,
) -> Iterator[dict]:
    """Samples of an img2dataset-style parquet file: an image bytes column, a caption column, and
    other columns (url, width, status, ...) that go into `metadata` as JSON (numbers stay numbers,
    nulls stay null; binary columns left out). Keys come from `key_column`, or are the row index
    (`000000042`) when it is absent or null.

    Read one row group at a time, in batches. A row group that fails to read (a corrupt page) is
    reported row by row as `truncated_member` (keys = row index) and the next row group is tried:
    row groups are independent. Raises `ShardSchemaError` when the columns are not there.
    """
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        columns = _ParquetColumns.resolve(parquet.schema_arrow, path, image_column, caption_column, key_column)
        first_row = 0
        for row_group in range(parquet.num_row_groups):
            num_rows = parquet.metadata.row_group(row_group).num_rows
            yield from _row_group_samples(parquet, row_group, first_row, num_rows, columns, url, batch_size)
            first_row += num_rows


def _row_group_samples(
    parquet: pq.ParquetFile, row_group: int, first_row: int, num_rows: int,
    columns: _ParquetColumns, url: str, batch_size: int,
) -> Iterator[dict]:
    done = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_size, row_groups=[row_group]):
            yield from _batch_samples(batch, first_row + done, columns, url)
            done += batch.num_rows
    except (OSError, pa.ArrowException) as err:
        log.warning("shard %s: row group %d unreadable after %d rows (%s)", url, row_group, done, err)
        keys = _row_group_keys(parquet, row_group, first_row, num_rows, columns.key)
        for key in keys[done:]:
            yield raw_sample(key, url, drop_reason=DropReason.TRUNCATED_MEMBER)


def _row_group_keys(
    parquet: pq.ParquetFile, row_group: int, first_row: int, num_rows: int, key: str | None
) -> list[str]:
    """The keys of a row group whose data failed to read: from its key column when that column
    still reads (the damage is often in the big image column), else the row indices."""
    index_keys = [f"{row:09d}" for row in range(first_row, first_row + num_rows)]
    if key is None:
        return index_keys
    try:
        values = parquet.read_row_group(row_group, columns=[key]).column(0).to_pylist()
    except (OSError, pa.ArrowException):
        return index_keys
    if len(values) != num_rows:
        return index_keys
    return [index_keys[i] if value is None else str(value) for i, value in enumerate(values)]


def _batch_samples(batch: pa.RecordBatch, first_row: int, columns: _ParquetColumns, url: str) -> Iterator[dict]:
    images = _image_values(batch, columns.image)
    captions = batch.column(columns.caption).to_pylist()
    keys = batch.column(columns.key).to_pylist() if columns.key else [None] * batch.num_rows
    metadata = batch.select(list(columns.metadata)).to_pylist() if columns.metadata else [{}] * batch.num_rows
    for i in range(batch.num_rows):
        key = f"{first_row + i:09d}" if keys[i] is None else str(keys[i])
        caption_value = captions[i]
        if caption_value is not None and not isinstance(caption_value, (str, bytes)):
            caption_value = str(caption_value)
        caption, caption_problem = try_caption(caption_value)
        image = images[i] or None
        yield raw_sample(
            key, url, caption=caption, image_bytes=image,
            metadata=json.dumps(_json_safe(metadata[i]), ensure_ascii=False, default=str),
            drop_reason=DropReason.MISSING_IMAGE if image is None else caption_problem,
        )
