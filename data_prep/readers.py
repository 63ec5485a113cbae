"""Per-shard sample iterators over webdataset tars, img2dataset parquet and image folders.

Every reader yields "raw samples", plain dicts with exactly the keys of `RAW_SAMPLE_KEYS`:

    {"key": str, "source_shard": str, "caption": str | None, "image_bytes": bytes | None,
     "metadata": str (a JSON object as text, "{}" when none), "drop_reason": str | None}

A sample that cannot be used still comes out, with `drop_reason` set and `image_bytes` None, so
that the pipeline counts it instead of losing it or crashing on it. Captions are decoded here (their
problems get their reason here); images stay bytes, decoded later by `data_prep.decode`.

Why not `ray.data.read_webdataset`: one truncated image, one non-UTF-8 caption or a tar cut short
makes it lose the whole shard. These readers salvage everything before a cut.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import posixpath
import re
import tarfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data_prep.decode import DecodeError, DropReason, decode_caption
from core.storage import raise_for_storage_error, resolve

log = logging.getLogger(__name__)

RAW_SAMPLE_KEYS = ("key", "source_shard", "caption", "image_bytes", "metadata", "drop_reason")
SHARD_FORMATS = ("webdataset", "parquet", "folder")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # webdataset member / folder file extensions
PARQUET_IMAGE_COLUMNS = ("jpg", "png", "webp", "image", "image_bytes")  # auto-detected, in this order
_SHARD_SUFFIXES = {"webdataset": (".tar", ".tar.gz", ".tgz"), "parquet": (".parquet",)}
_GLOB_CHARS = re.compile(r"[*?\[]")


class ShardSchemaError(ValueError):
    """A parquet shard lacks the columns the job was configured for. Raised (not turned into a
    dropped sample) because it is a configuration mistake that every shard would repeat."""


def raw_sample(
    key: str,
    source_shard: str,
    *,
    caption: str | None = None,
    image_bytes: bytes | None = None,
    metadata: str = "{}",
    drop_reason: str | None = None,
) -> dict:
    """The one place a raw sample dict is built, so every reader yields the same keys."""
    if drop_reason is not None:
        image_bytes = None
    return {
        "key": key,
        "source_shard": source_shard,
        "caption": caption,
        "image_bytes": image_bytes,
        "metadata": metadata,
        "drop_reason": drop_reason,
    }


def _try_caption(data: bytes | str | None) -> tuple[str | None, str | None]:
    """(caption, None) or (None, drop reason): caption problems are reasons, not exceptions."""
    try:
        return decode_caption(data), None
    except DecodeError as err:
        return None, err.reason


def _metadata_text(data: bytes | None) -> str:
    """A JSON sidecar passed through as text; "{}" when absent, not UTF-8, not JSON, or not an
    object. Broken metadata costs the metadata, never the sample."""
    if data is None:
        return "{}"
    try:
        text = data.decode("utf-8-sig")
        return text if isinstance(json.loads(text), dict) else "{}"
    except (UnicodeDecodeError, ValueError):
        return "{}"


# -- webdataset tars -------------------------------------------------------------------------------

class _CutAwareTarInfo(tarfile.TarInfo):
    """Notes on the TarFile when a header is missing, short or garbage. `tarfile` treats those as
    the end of the archive once past the first member, so without this a tar cut between two
    members would end silently; a proper end is a block of zeros (EOFHeaderError), not noted."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError):
            tar.cut_in_header = True
            raise


class _CutAwareTarFile(tarfile.TarFile):
    tarinfo = _CutAwareTarInfo
    cut_in_header = False


@dataclass
class _Group:
    """The members of one sample key seen so far (the first of each kind wins)."""

    key: str
    image: bytes | None = None
    caption: bytes | None = None
    metadata: bytes | None = None
    truncated: bool = False
    unsafe: bool = False

    def is_complete(self) -> bool:
        return self.image is not None and self.caption is not None

    def to_sample(self, url: str) -> dict:
        if self.unsafe:
            return raw_sample(self.key, url, drop_reason=DropReason.UNSAFE_MEMBER_NAME)
        caption, caption_problem = _try_caption(self.caption)
        if self.truncated:
            reason = DropReason.TRUNCATED_MEMBER
        elif self.image is None:
            reason = DropReason.MISSING_IMAGE
        else:
            reason = caption_problem
        return raw_sample(
            self.key, url, caption=caption, image_bytes=self.image,
            metadata=_metadata_text(self.metadata), drop_reason=reason,
        )


def _is_unsafe_name(name: str) -> bool:
    """Absolute paths and `..` components (backslashes count as separators too: the key may end
    up in a path on another OS). Such a member is reported, never read or extracted."""
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return True
    return ".." in re.split(r"[/\\]", name)


def _split_member_name(name: str) -> tuple[str, str] | None:
    """`dir/KEY.ext.more` -> ("dir/KEY", "ext.more") (webdataset's rule: the key ends at the first
    dot of the basename; `.` path components dropped). None for hidden files (`.DS_Store`,
    macOS `._x.jpg`), which are not samples."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or parts[-1].startswith("."):
        return None
    stem, _, extension = parts[-1].partition(".")
    return posixpath.join(*parts[:-1], stem), extension.lower()


def iter_webdataset_shard(url: str, fs: pafs.FileSystem, path: str, max_open_keys: int = 64) -> Iterator[dict]:
    """Samples of an img2dataset-style tar (`KEY.jpg|jpeg|png|webp`, `KEY.txt`, optional
    `KEY.json`), streamed: the tar is read once, front to back, never held whole nor extracted.

    Members are grouped by key. Writers put a key's members next to each other; to tolerate
    scattered members without holding the shard in memory, up to `max_open_keys` keys stay open
    and a key is emitted once that many newer keys were seen (a key reappearing after that becomes
    a second sample). Samples come out in the order each key first appears.

    A shard cut short yields every sample completed before the cut; the sample whose member was
    being read is `truncated_member`. A cut between members (at a header) marks the last sample
    `truncated_member` if it lacks its image or caption, otherwise an extra `truncated_member`
    sample with key "" records that the shard was cut. Directories, links and special members
    are skipped: they hold no sample data.
    """
    # compression=None: pyarrow would otherwise gunzip `.tar.gz` itself and fail at the first read
    # of a cut file; tarfile's own gzip reading hands over every member before the cut.
    with fs.open_input_stream(path, compression=None) as stream:
        with _CutAwareTarFile.open(fileobj=stream, mode="r|*") as tar:
            yield from _tar_samples(tar, url, max_open_keys)


def _tar_samples(tar: _CutAwareTarFile, url: str, max_open_keys: int) -> Iterator[dict]:
    groups: OrderedDict[object, _Group] = OrderedDict()
    last: _Group | None = None  # the group of the latest member: the one being read at a cut
    members = iter(tar)
    while True:
        try:
            member = next(members)
        except StopIteration:
            break
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:  # a broken header past the first
            log.warning("shard %s: tar ends early (%s)", url, err)
            tar.cut_in_header = True
            break
        group = _add_member(tar, member, groups)
        if group is None:
            continue
        last = group
        if group.truncated:
            log.warning("shard %s: cut short inside member %s", url, member.name)
            break
        while len(groups) > max_open_keys:
            yield groups.popitem(last=False)[1].to_sample(url)
    cut_unattributed = tar.cut_in_header and not (last is not None and last.truncated)
    if cut_unattributed and last is not None and groups.get(last.key) is last and not last.is_complete():
        last.truncated = True  # its missing member was most likely the one cut off
        cut_unattributed = False
    for group in groups.values():
        yield group.to_sample(url)
    if cut_unattributed:
        yield raw_sample("", url, drop_reason=DropReason.TRUNCATED_MEMBER)


def _add_member(tar: tarfile.TarFile, member: tarfile.TarInfo, groups: OrderedDict) -> _Group | None:
    """Files one member into its key's group (reading its data when it is needed); returns the
    group, or None for members that are not sample data."""
    if not member.isfile():
        return None
    if _is_unsafe_name(member.name):
        group = _Group(key=member.name, unsafe=True)
        groups[("unsafe", member.offset)] = group
        return group
    split = _split_member_name(member.name)
    if split is None:
        return None
    key, extension = split
    group = groups.setdefault(key, _Group(key=key))
    slot = _slot_for(extension)
    if slot is None or getattr(group, slot) is not None:
        return group  # not a field we use (or a second one): its data is skipped, unread
    try:
        data = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        group.truncated = True
        return group
    setattr(group, slot, data)
    return group


def _slot_for(extension: str) -> str | None:
    if extension in IMAGE_EXTENSIONS:
        return "image"
    return {"txt": "caption", "json": "metadata"}.get(extension)


# -- img2dataset parquet ---------------------------------------------------------------------------

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
        caption, caption_problem = _try_caption(caption_value)
        image = images[i] or None
        yield raw_sample(
            key, url, caption=caption, image_bytes=image,
            metadata=json.dumps(_json_safe(metadata[i]), ensure_ascii=False, default=str),
            drop_reason=DropReason.MISSING_IMAGE if image is None else caption_problem,
        )


# -- image folders ---------------------------------------------------------------------------------

def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS and "." in name


def _list_files(fs: pafs.FileSystem, path: str) -> dict[str, str]:
    """base name -> path of the regular files directly in `path` (hidden files left out)."""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return {i.base_name: i.path for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith(".")}


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes | None:
    try:
        with fs.open_input_file(path) as f:
            return f.read()
    except OSError as err:
        log.warning("cannot read %s (%s)", path, err)
        return None


def iter_folder_shard(url: str, fs: pafs.FileSystem, path: str) -> Iterator[dict]:
    """Samples of one folder: `NAME.jpg|jpeg|png|webp` (any case) with `NAME.txt` and optional
    `NAME.json` beside it; key = NAME (the file stem). Non-recursive (subfolders are shards of
    their own, see `list_shards`), sorted by key. A `NAME.txt` without an image is reported as
    `missing_image`; an image file that cannot be read as `missing_image` too.
    """
    files = _list_files(fs, path)
    sidecars = _sidecars(files)
    images = sorted((name.rpartition(".")[0], name) for name in files if _is_image_name(name))
    image_stems = {stem for stem, _ in images}
    entries = images + [(stem, None) for stem, kind in sidecars if kind == "txt" and stem not in image_stems]
    for stem, image_name in sorted(entries, key=lambda entry: (entry[0], entry[1] or "")):
        yield _folder_sample(fs, url, stem, image_name and files[image_name], sidecars)


def _sidecars(files: dict[str, str]) -> dict[tuple[str, str], str]:
    """(stem, "txt" | "json") -> path. `NAME.txt` is preferred over `NAME.TXT` when both exist."""
    sidecars = {}
    for name in sorted(files, key=lambda n: (not n.endswith((".txt", ".json")), n)):
        stem, _, extension = name.rpartition(".")
        if stem and extension.lower() in ("txt", "json"):
            sidecars.setdefault((stem, extension.lower()), files[name])
    return sidecars


def _folder_sample(fs: pafs.FileSystem, url: str, stem: str, image_path: str | None, sidecars: dict) -> dict:
    caption_path = sidecars.get((stem, "txt"))
    metadata_path = sidecars.get((stem, "json"))
    caption, caption_problem = _try_caption(_read_bytes(fs, caption_path) if caption_path else None)
    metadata = _metadata_text(_read_bytes(fs, metadata_path)) if metadata_path else "{}"
    image = _read_bytes(fs, image_path) if image_path else None
    reason = DropReason.MISSING_IMAGE if image is None else caption_problem
    return raw_sample(stem, url, caption=caption, image_bytes=image, metadata=metadata, drop_reason=reason)


# -- any shard -------------------------------------------------------------------------------------

READERS: dict[str, Callable[..., Iterator[dict]]] = {
    "webdataset": iter_webdataset_shard,
    "parquet": iter_parquet_shard,
    "folder": iter_folder_shard,
}


def iter_shard(url: str, fs: pafs.FileSystem, path: str, fmt: str, **options) -> Iterator[dict]:
    """The samples of one shard in format `fmt`, never raising for bad data: a shard that cannot
    be opened at all (missing, not a tar/parquet) yields one `unreadable_shard` sample (key ""), and
    a failure a reader did not foresee after some samples yields one `truncated_member` (key "").
    `ShardSchemaError` (parquet columns not as configured) and a `StorageError` (access denied) are
    raised: they are the job's mistakes, which every shard would repeat.
    """
    if fmt not in READERS:
        raise ValueError(f"unknown shard format {fmt!r}; expected one of {SHARD_FORMATS}")
    yielded = 0
    try:
        for sample in READERS[fmt](url, fs, path, **options):
            yielded += 1
            yield sample
    except ShardSchemaError:
        raise
    except Exception as err:  # noqa: BLE001 - one bad shard must not fail the job
        if isinstance(err, OSError):
            # ... but a refusal (or a missing bucket) is the job's setup, not a bad shard: counted as
            # unreadable, the shard would be committed and never read again.
            raise_for_storage_error(err, path)
        reason = DropReason.TRUNCATED_MEMBER if yielded else DropReason.UNREADABLE_SHARD
        log.warning("shard %s: %s after %d samples (%s: %s)", url, reason, yielded, type(err).__name__, err)
        yield raw_sample("", url, drop_reason=reason)


# -- finding the shards ----------------------------------------------------------------------------

def list_shards(source_url: str, fmt: str) -> tuple[pafs.FileSystem, list[tuple[str, str]]]:
    """A source URL -> (filesystem, sorted [(shard URL, path)]).

    `source_url` is a local path, `file:///abs/path` or `s3://bucket/prefix`, pointing at one shard
    file, a directory (its `*.tar` / `*.parquet`; for "folder", the directory itself and each
    immediate subdirectory that holds images), or a glob in the last component (`shard-*.tar`).
    The shard URL (`file:///...`, `s3://...`) is the shard's identity downstream.

    The filesystem comes from `core.storage.resolve` (S3: the bucket's own region, and a
    `StorageError` for a missing bucket or a refusal). The read tasks must be given this filesystem,
    not build their own, so that they use the region the listing found.
    """
    if fmt not in SHARD_FORMATS:
        raise ValueError(f"unknown shard format {fmt!r}; expected one of {SHARD_FORMATS}")
    fs, parent, pattern, to_url = _resolve_source(source_url)
    if pattern is None:
        paths = _shards_at(fs, parent, fmt)
    else:
        paths = _shards_matching(fs, parent, pattern, fmt)
    if not paths:
        raise FileNotFoundError(f"no {fmt} shards at {source_url!r}")
    return fs, sorted((to_url(p), p) for p in paths)


def _resolve_source(source_url: str) -> tuple[pafs.FileSystem, str, str | None, Callable[[str], str]]:
    """-> (filesystem, path, glob pattern of the last component or None, path -> shard URL)."""
    parts = urlsplit(source_url)
    if parts.scheme in ("", "file"):
        fs, path = resolve(source_url)
        parent, pattern = _split_glob(path)
        return fs, parent, pattern, lambda p: "file://" + p
    parent_path, pattern = _split_glob(parts.path)
    fs, parent = resolve(urlunsplit((parts.scheme, parts.netloc, parent_path, parts.query, "")))
    scheme = parts.scheme
    return fs, parent.rstrip("/"), pattern, lambda p: f"{scheme}://{p}"


def _split_glob(path: str) -> tuple[str, str | None]:
    """`/data/shard-*.tar` -> ("/data", "shard-*.tar"); a path without glob characters -> (path, None).
    Only the last component may be a pattern."""
    head, _, last = path.rstrip("/").rpartition("/")
    if _GLOB_CHARS.search(head):
        raise ValueError(f"only the last path component may be a glob pattern: {path!r}")
    if _GLOB_CHARS.search(last):
        return head or "/", last
    return path.rstrip("/") or "/", None


def _shards_at(fs: pafs.FileSystem, path: str, fmt: str) -> list[str]:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if fmt == "folder":
        if info.type != pafs.FileType.Directory:
            return []
        subdirs = [i.path for i in _children(fs, path) if i.type == pafs.FileType.Directory]
        return [d for d in [path, *subdirs] if _holds_images(fs, d)]
    if info.type == pafs.FileType.File:
        return [path]  # a shard named explicitly is taken whatever its suffix
    return [i.path for i in _children(fs, path) if _is_shard_file(i, fmt)]


def _shards_matching(fs: pafs.FileSystem, parent: str, pattern: str, fmt: str) -> list[str]:
    if fs.get_file_info(parent).type != pafs.FileType.Directory:
        return []
    matches = [i for i in _children(fs, parent) if fnmatch.fnmatchcase(i.base_name, pattern)]
    if fmt == "folder":
        return [i.path for i in matches if i.type == pafs.FileType.Directory and _holds_images(fs, i.path)]
    return [i.path for i in matches if _is_shard_file(i, fmt)]


def _children(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    return [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=False)) if not i.base_name.startswith(".")]


def _is_shard_file(info: pafs.FileInfo, fmt: str) -> bool:
    return info.type == pafs.FileType.File and info.base_name.lower().endswith(_SHARD_SUFFIXES[fmt])


def _holds_images(fs: pafs.FileSystem, path: str) -> bool:
    return any(i.type == pafs.FileType.File and _is_image_name(i.base_name) for i in _children(fs, path))
