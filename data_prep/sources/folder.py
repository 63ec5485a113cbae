"""Image folders: `NAME.jpg|jpeg|png|webp` with `NAME.txt` and optional `NAME.json` beside it. A
source is a folder (or a glob of folders) whose subfolders holding images are shards too."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs

from data_prep.decode import DropReason
from data_prep.sources.listing import children, list_shards
from data_prep.sources.samples import IMAGE_EXTENSIONS, metadata_text, raw_sample, salvaged, try_caption

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FolderReader:
    """The shards of a source: the folder itself and its immediate subfolders, those that hold images."""

    @staticmethod
    def options(source) -> dict:
        return {}

    def list_shards(self, source_url: str) -> tuple[pafs.FileSystem, list[tuple[str, str]]]:
        return list_shards(source_url, "folder", _holds_images, folders=True)

    def iter_shard(self, url: str, fs: pafs.FileSystem, path: str) -> Iterator[dict]:
        return salvaged(iter_folder_shard(url, fs, path), url, path)


def _holds_images(fs: pafs.FileSystem, info: pafs.FileInfo) -> bool:
    return info.type == pafs.FileType.Directory and any(
        i.type == pafs.FileType.File and _is_image_name(i.base_name) for i in children(fs, info.path)
    )


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
    caption, caption_problem = try_caption(_read_bytes(fs, caption_path) if caption_path else None)
    metadata = metadata_text(_read_bytes(fs, metadata_path)) if metadata_path else "{}"
    image = _read_bytes(fs, image_path) if image_path else None
    reason = DropReason.MISSING_IMAGE if image is None else caption_problem
    return raw_sample(stem, url, caption=caption, image_bytes=image, metadata=metadata, drop_reason=reason)
