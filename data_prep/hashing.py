"""Exact and near-duplicate detection for image-text pairs.

Two kinds of duplicates matter when building a training set: byte-identical files (the same image
scraped twice) and the same picture re-encoded, resized or slightly recompressed. The first is caught
with a content hash, the second with a 64-bit perceptual hash (pHash) compared by Hamming distance.
`Deduplicator` combines both, within one run and against what an existing cache already holds.

numpy and PIL only: the DCT is a 32x32 matrix product, and the near-duplicate index is the pigeonhole
multi-index (exact lookups on disjoint chunks of the hash, then a Hamming check on the candidates).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

HASH_BITS = 64
_DCT_SIZE = 32  # the image is shrunk to 32x32 before the DCT ...
_LOW_FREQ = 8  # ... and the top-left 8x8 block (64 coefficients -> 64 bits) is kept
# Coefficients are rounded to this many decimals before the median test. Without it, a flat image's AC
# coefficients are pure float rounding noise (+-1e-13) and its hash would depend on the BLAS at hand;
# with it they are exactly 0. Real coefficients are O(1..1e5), so only exact ties are affected.
_ROUND_DECIMALS = 6


def content_hash(image_bytes: bytes) -> str:
    """sha256 hex digest of the encoded bytes: equal digests mean byte-identical files."""
    return hashlib.sha256(image_bytes).hexdigest()


@lru_cache(maxsize=1)
def _dct_rows() -> np.ndarray:
    """The first 8 rows of the unnormalised 32-point DCT-II matrix, C[k, n] = cos(pi (2n + 1) k / 64).

    No orthonormal scaling: it would weigh row/column 0 differently from the rest, and the standard
    pHash (scipy's `dct(..., norm=None)`, a uniform factor 2 away from this) compares raw coefficients.
    A uniform factor changes no bit, so it is left out.
    """
    k = np.arange(_LOW_FREQ, dtype=np.float64)[:, None]
    n = np.arange(_DCT_SIZE, dtype=np.float64)[None, :]
    rows = np.cos(np.pi * (2.0 * n + 1.0) * k / (2.0 * _DCT_SIZE))
    rows.setflags(write=False)
    return rows


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composites a transparent image on white, as the pipeline shows it; converting RGBA straight to
    grayscale would hash whatever colour the invisible pixels happen to carry."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image


def dct_low_frequencies(image: Image.Image) -> np.ndarray:
    """The 8x8 low-frequency block of the 2-D DCT-II of the 32x32 grayscale image (float64).

    Exposed for tests and diagnostics; `perceptual_hash` thresholds it at its median.
    """
    gray = _flatten_alpha(image).convert("L").resize((_DCT_SIZE, _DCT_SIZE), Image.Resampling.LANCZOS)
    pixels = np.asarray(gray, dtype=np.float64)
    rows = _dct_rows()
    return rows @ pixels @ rows.T  # DCT along columns then rows, only the 8 lowest frequencies of each


def perceptual_hash(image: Image.Image) -> int:
    """The standard 64-bit pHash: grayscale, 32x32 Lanczos, 2-D DCT-II, top-left 8x8 block, bit set where
    the coefficient exceeds the block's median (DC included). Bit i is row-major position i of the block.

    Transparent images are first composited on white (see `_flatten_alpha`).
    """
    low = np.round(dct_low_frequencies(image), _ROUND_DECIMALS)
    bits = (low > np.median(low)).reshape(-1)
    return int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little")



def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return (a ^ b).bit_count()


def _popcount(values: np.ndarray) -> np.ndarray:
    """Per-element popcount of a uint64 array (numpy >= 2 has it built in; SWAR fallback for 1.26)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    v = values - ((values >> np.uint64(1)) & np.uint64(0x5555555555555555))
    v = (v & np.uint64(0x3333333333333333)) + ((v >> np.uint64(2)) & np.uint64(0x3333333333333333))
    v = (v + (v >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (v * np.uint64(0x0101010101010101)) >> np.uint64(56)


class _LargeBucket:
    """A chunk bucket that outgrew a Python list: hashes in a capacity-doubling uint64 array, so the
    Hamming check over hundreds or thousands of candidates is one vectorised pass."""

    __slots__ = ("hashes", "ids", "size")

    def __init__(self, ids: list[int], hash_of: list[int]):
        self.ids = list(ids)
        self.size = len(ids)
        self.hashes = np.zeros(2 * self.size, dtype=np.uint64)
        self.hashes[: self.size] = [hash_of[i] for i in ids]

    def append(self, h: int, item: int) -> None:
        if self.size == len(self.hashes):
            self.hashes = np.concatenate([self.hashes, np.zeros(self.size, dtype=np.uint64)])
        self.hashes[self.size] = h
        self.ids.append(item)
        self.size += 1

    def first_within(self, h: int, max_distance: int) -> int | None:
        near = _popcount(self.hashes[: self.size] ^ np.uint64(h)) <= max_distance
        first = int(near.argmax())
        return self.ids[first] if near[first] else None


# A bucket is a bare item id while it holds one item (most buckets when chunks are wide), a list of ids
# while small (a Python loop beats numpy's per-call overhead there), then a _LargeBucket.
_SMALL_BUCKET = 24


class NearDuplicateIndex:
    """64-bit hashes, queried for any stored hash within Hamming distance `max_distance`.

    Pigeonhole multi-index: the 64 bits are split into max_distance + 1 disjoint chunks. Two hashes that
    differ in at most d bits cannot differ in all d + 1 chunks, so any match agrees exactly with the query
    on at least one chunk. Each chunk has a dict chunk value -> bucket of items; a query looks up its own
    chunk values and verifies the candidates with the true Hamming distance. Exact, no false negatives.

    Cost per query is ~(d + 1) * n / 2**(64 / (d + 1)) candidates for uniformly spread hashes: fine for
    10**6 hashes up to d ~ 8; large d makes chunks narrow and buckets crowded.
    """

    def __init__(self, max_distance: int):
        if isinstance(max_distance, bool) or not isinstance(max_distance, int):
            raise ValueError(f"max_distance must be an int in [0, 31], got {max_distance!r}")
        if not 0 <= max_distance <= 31:
            raise ValueError(
                f"max_distance must be in [0, 31], got {max_distance}: 32 or more of 64 bits apart is no "
                "longer 'near' (unrelated images are ~32 apart) and the chunks would be under 2 bits wide"
            )
        self.max_distance = max_distance
        self._chunks = self._chunk_layout(max_distance + 1)
        self._tables: list[dict[int, Any]] = [{} for _ in self._chunks]
        self._hash_of: list[int] = []
        self._key_of: list[Any] = []

    @staticmethod
    def _chunk_layout(count: int) -> list[tuple[int, int]]:
        """(shift, mask) of `count` disjoint chunks covering the 64 bits, widths differing by at most 1."""
        base, extra = divmod(HASH_BITS, count)
        layout, start = [], 0
        for i in range(count):
            width = base + (1 if i < extra else 0)
            layout.append((start, (1 << width) - 1))
            start += width
        return layout

    def __len__(self) -> int:
        return len(self._hash_of)

    def add(self, h: int, key: Any = None) -> None:
        """Stores `h` (an int in [0, 2**64)); `key` is what `find` returns for it (True when None)."""
        if not 0 <= h < 1 << HASH_BITS:
            raise ValueError(f"hash must be an unsigned 64-bit int, got {h!r}")
        item = len(self._hash_of)
        self._hash_of.append(h)
        self._key_of.append(True if key is None else key)
        for (shift, mask), table in zip(self._chunks, self._tables):
            chunk = (h >> shift) & mask
            bucket = table.get(chunk)
            if bucket is None:
                table[chunk] = item
            elif type(bucket) is int:
                table[chunk] = [bucket, item]
            elif type(bucket) is list:
                bucket.append(item)
                if len(bucket) > _SMALL_BUCKET:
                    table[chunk] = _LargeBucket(bucket, self._hash_of)
            else:
                bucket.append(h, item)

    def find(self, h: int) -> Any | None:
        """The key (True when added without one) of a stored hash within max_distance of `h`, else None.
        Which one, when several are, is unspecified."""
        item = self._find_item(h)
        return None if item is None else self._key_of[item]

    def _find_item(self, h: int) -> int | None:
        d, hash_of = self.max_distance, self._hash_of
        for (shift, mask), table in zip(self._chunks, self._tables):
            bucket = table.get((h >> shift) & mask)
            if bucket is None:
                continue
            if type(bucket) is int:
                if (hash_of[bucket] ^ h).bit_count() <= d:
                    return bucket
            elif type(bucket) is list:
                for item in bucket:
                    if (hash_of[item] ^ h).bit_count() <= d:
                        return item
            else:
                item = bucket.first_within(h, d)
                if item is not None:
                    return item
        return None


class Deduplicator:
    """Tracks content hashes (exact duplicates) and pHashes (near duplicates) seen so far.

    `check` both tests and registers, so a run keeps the first occurrence and drops later copies; `preload`
    registers what an existing cache holds, so an incremental run drops what is already cached.
    `max_distance=None` turns near-duplicate detection off (exact only); `exact=False` turns exact
    detection off (near only): content hashes are then neither looked up nor registered.
    """

    EXACT = "duplicate_exact"
    NEAR = "duplicate_near"

    def __init__(self, max_distance: int | None, exact: bool = True):
        if not exact and max_distance is None:
            raise ValueError("a Deduplicator needs exact detection, a near max_distance, or both")
        self._exact: dict[str, str | None] | None = {} if exact else None
        self._near = None if max_distance is None else NearDuplicateIndex(max_distance)
        self._registered = 0

    @property
    def max_distance(self) -> int | None:
        return None if self._near is None else self._near.max_distance

    def __len__(self) -> int:
        """Number of registered samples."""
        return self._registered

    def check(self, content: str | None, phash: int | None, key: str) -> str | None:
        """"duplicate_exact" / "duplicate_near" (the sample is not registered) or None (it is).

        Exact wins over near. A sample without a pHash (not decodable, or hashing skipped) can only be
        an exact duplicate, and is registered for exact matching only. `content` is ignored when exact
        detection is off.
        """
        if self._exact is not None and content in self._exact:
            return self.EXACT
        if self._near is not None and phash is not None and self._near.find(phash) is not None:
            return self.NEAR
        self._register(content, phash, key)
        return None

    def preload(self, pairs: Iterable[tuple[str, int | None]]) -> None:
        """Registers (content hash, pHash or None) pairs without checking them against each other: a cache
        written with other settings may hold near duplicates of itself, and that is not this run's call."""
        for content, phash in pairs:
            if self._exact is None or content not in self._exact:
                self._register(content, phash, None)

    def _register(self, content: str | None, phash: int | None, key: str | None) -> None:
        self._registered += 1
        if self._exact is not None:
            self._exact[content] = key
        if self._near is not None and phash is not None:
            self._near.add(phash, key)
