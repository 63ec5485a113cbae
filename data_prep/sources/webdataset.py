"""webdataset tars (img2dataset's output): `KEY.jpg|jpeg|png|webp`, `KEY.txt`, optional `KEY.json`.

Why not `ray.data.read_webdataset`: one truncated image, one non-UTF-8 caption or a tar cut short
makes it lose the whole shard. This reader salvages everything before a cut.
"""

from __future__ import annotations

import logging
import posixpath
import re
import tarfile
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs

from data_prep.decode import DropReason
from data_prep.sources.listing import list_shards, shard_files
from data_prep.sources.samples import IMAGE_EXTENSIONS, metadata_text, raw_sample, salvaged, try_caption

log = logging.getLogger(__name__)

SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class WebDatasetReader:
    """The shards of a source: its tar files."""

    @staticmethod
    def options(source) -> dict:
        return {}

    def list_shards(self, source_url: str) -> tuple[pafs.FileSystem, list[tuple[str, str]]]:
        return list_shards(source_url, "webdataset", shard_files(SUFFIXES))

    def iter_shard(self, url: str, fs: pafs.FileSystem, path: str) -> Iterator[dict]:
        return salvaged(iter_webdataset_shard(url, fs, path), url, path)


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
        caption, caption_problem = try_caption(self.caption)
        if self.truncated:
            reason = DropReason.TRUNCATED_MEMBER
        elif self.image is None:
            reason = DropReason.MISSING_IMAGE
        else:
            reason = caption_problem
        return raw_sample(
            self.key, url, caption=caption, image_bytes=self.image,
            metadata=metadata_text(self.metadata), drop_reason=reason,
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
