"""Finding a source's shards: a source URL -> its filesystem and sorted [(shard URL, path)], for the
formats whose shards are files or folders. Each format says which entries are its shards."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from core.storage import resolve

_GLOB_CHARS = re.compile(r"[*?\[]")

# (filesystem, entry) -> whether the entry is a shard of the format
IsShard = Callable[[pafs.FileSystem, pafs.FileInfo], bool]


def list_shards(source_url: str, fmt: str, is_shard: IsShard, folders: bool = False) -> tuple[pafs.FileSystem, list[tuple[str, str]]]:
    """A source URL -> (filesystem, sorted [(shard URL, path)]).

    `source_url` is a local path, `file:///abs/path` or `s3://bucket/prefix`, pointing at one shard
    file, a directory (its entries that `is_shard`; with `folders`, shards are directories: the
    directory itself and each immediate subdirectory that `is_shard`), or a glob in the last component
    (`shard-*.tar`). The shard URL (`file:///...`, `s3://...`) is the shard's identity downstream.

    The filesystem comes from `core.storage.resolve` (S3: the bucket's own region, and a
    `StorageError` for a missing bucket or a refusal). The read tasks must be given this filesystem,
    not build their own, so that they use the region the listing found.
    """
    fs, parent, pattern, to_url = _resolve_source(source_url)
    if pattern is None:
        paths = _shards_at(fs, parent, is_shard, folders)
    elif fs.get_file_info(parent).type == pafs.FileType.Directory:
        paths = [i.path for i in children(fs, parent) if fnmatch.fnmatchcase(i.base_name, pattern) and is_shard(fs, i)]
    else:
        paths = []
    if not paths:
        raise FileNotFoundError(f"no {fmt} shards at {source_url!r}")
    return fs, sorted((to_url(p), p) for p in paths)


def shard_files(suffixes: tuple[str, ...]) -> IsShard:
    """The shards of a format of shard files: the files with one of `suffixes` (any case)."""
    return lambda fs, info: info.type == pafs.FileType.File and info.base_name.lower().endswith(suffixes)


def children(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """The entries directly in `path`, hidden ones left out."""
    return [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=False)) if not i.base_name.startswith(".")]


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
    Only the last path component may be a pattern."""
    head, _, last = path.rstrip("/").rpartition("/")
    if _GLOB_CHARS.search(head):
        raise ValueError(f"only the last path component may be a glob pattern: {path!r}")
    if _GLOB_CHARS.search(last):
        return head or "/", last
    return path.rstrip("/") or "/", None


def _shards_at(fs: pafs.FileSystem, path: str, is_shard: IsShard, folders: bool) -> list[str]:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [] if folders else [path]  # a shard file named explicitly is taken whatever its suffix
    return [i.path for i in ([info] if folders else []) + children(fs, path) if is_shard(fs, i)]
