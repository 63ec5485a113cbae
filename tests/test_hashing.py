"""data_prep.hashing: content hash, pHash against a hand-written DCT, the pigeonhole index against brute force,
and the Deduplicator's exact / near / preload behaviour."""
import io
import math
import random
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data_prep.hashing import (
    Deduplicator,
    NearDuplicateIndex,
    content_hash,
    dct_low_frequencies,
    hamming,
    perceptual_hash,
)


def synthetic_photo(seed: int, size: int = 256) -> Image.Image:
    """A smooth, natural-ish picture: a two-colour gradient at a random angle plus a few soft shapes."""
    rng = random.Random(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * math.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3.0
    c0, c1 = np.array([rng.randint(0, 255) for _ in range(3)]), np.array([rng.randint(0, 255) for _ in range(3)])
    pixels = (c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.randint(0, size * 3 // 4), rng.randint(0, size * 3 // 4)
        w, h = rng.randint(size // 8, size // 3), rng.randint(size // 8, size // 3)
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    return image


def reference_low_dct(image: Image.Image) -> np.ndarray:
    """The textbook double sum F(u, v) = sum_y sum_x p(y, x) cos(pi (2y+1) u / 64) cos(pi (2x+1) v / 64)."""
    p = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    out = np.zeros((8, 8))
    for u in range(8):
        for v in range(8):
            total = 0.0
            for y in range(32):
                cy = math.cos(math.pi * (2 * y + 1) * u / 64)
                for x in range(32):
                    total += p[y, x] * cy * math.cos(math.pi * (2 * x + 1) * v / 64)
            out[u, v] = total
    return out


def test_content_hash_is_sha256():
    assert content_hash(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert content_hash(b"abc") != content_hash(b"abd")


def test_phash_matches_hand_computed_dct():
    image = synthetic_photo(3)
    reference = reference_low_dct(image)
    np.testing.assert_allclose(dct_low_frequencies(image), reference, rtol=1e-9, atol=1e-6)
    bits = (reference > np.median(reference)).reshape(-1)
    expected = sum(1 << i for i, bit in enumerate(bits) if bit)
    assert perceptual_hash(image) == expected
    assert expected & 1  # the DC coefficient (a positive sum of pixels) is far above the median


def test_phash_flat_images_are_exact_not_float_noise():
    # Every AC coefficient of a flat image is 0 up to rounding noise: only the DC bit may be set.
    assert perceptual_hash(Image.new("L", (50, 70), 200)) == 1
    assert perceptual_hash(Image.new("RGB", (64, 64), (10, 200, 30))) == 1
    assert perceptual_hash(Image.new("L", (64, 64), 0)) == 0


def test_phash_composites_transparency_on_white():
    base = synthetic_photo(5).convert("RGBA")
    garbage = np.asarray(base).copy()
    garbage[:, :128, 3] = 0  # left half invisible ...
    garbage[:, :128, :3] = np.random.default_rng(0).integers(0, 256, (256, 128, 3))  # ... with noisy colour
    on_white = np.asarray(base).copy()
    on_white[:, :128, :3] = 255
    on_white[..., 3] = 255
    assert perceptual_hash(Image.fromarray(garbage, "RGBA")) == perceptual_hash(Image.fromarray(on_white, "RGBA"))


def test_identical_images_distance_zero():
    a, b = synthetic_photo(1), synthetic_photo(1)
    assert hamming(perceptual_hash(a), perceptual_hash(b)) == 0


def test_resized_reencoded_jpeg_is_near():
    for seed in range(5):
        original = synthetic_photo(seed)
        buffer = io.BytesIO()
        original.resize((200, 200), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=70)
        copy = Image.open(io.BytesIO(buffer.getvalue()))
        distance = hamming(perceptual_hash(original), perceptual_hash(copy))
        assert distance <= 6, (seed, distance)


def test_unrelated_images_are_far():
    hashes = [perceptual_hash(synthetic_photo(seed)) for seed in range(10, 16)]
    distances = [hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]]
    assert min(distances) >= 20, distances


def test_hamming():
    assert hamming(0, 0) == 0
    assert hamming(0b1011, 0b0001) == 2
    assert hamming(0, (1 << 64) - 1) == 64


@pytest.mark.parametrize("bad", [-1, 32, 64, 2.0, True, None])
def test_index_rejects_bad_max_distance(bad):
    with pytest.raises(ValueError, match="max_distance"):
        NearDuplicateIndex(bad)


def test_index_rejects_out_of_range_hash():
    index = NearDuplicateIndex(2)
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError, match="64-bit"):
            index.add(bad)


def flip_bits(h: int, count: int, rng: random.Random) -> int:
    for bit in rng.sample(range(64), count):
        h ^= 1 << bit
    return h


@pytest.mark.parametrize("max_distance", [0, 4, 31])
def test_index_matches_brute_force(max_distance):
    rng = random.Random(max_distance)
    stored = [rng.getrandbits(64) for _ in range(5000)]
    index = NearDuplicateIndex(max_distance)
    for i, h in enumerate(stored):
        index.add(h, key=i)
    assert len(index) == 5000

    # Half planted neighbours at distances around the threshold, half random queries.
    queries = [flip_bits(rng.choice(stored), rng.randint(0, max_distance + 2), rng) for _ in range(250)]
    queries += [rng.getrandbits(64) for _ in range(250)]
    stored_array = np.array(stored, dtype=np.uint64)
    found_some = missed = 0
    for q in queries:
        nearest = int(np.bitwise_count(stored_array ^ np.uint64(q)).min())
        key = index.find(q)
        if nearest <= max_distance:
            assert key is not None and hamming(stored[key], q) <= max_distance
            found_some += 1
        else:
            assert key is None
            missed += 1
    assert found_some >= 50  # planted neighbours within range exist (and were found)
    if max_distance < 31:
        assert missed >= 250  # and so do queries with nothing in range


def test_index_returns_true_without_key_and_handles_crowded_buckets():
    index = NearDuplicateIndex(3)
    base = 0xDEADBEEF_00000000
    for low in range(200):  # identical high chunks: grows buckets past the small-list stage
        index.add(base | (low << 8))
    assert index.find(base | (7 << 8) | 0b11) is True
    assert index.find(base ^ (0b1111 << 60) | 0xFF) is None  # 4 bits away in the high part, plus low-byte noise


def test_index_timing_200k_at_distance_6():
    rng = random.Random(0)
    hashes = [rng.getrandbits(64) for _ in range(200_000)]
    index = NearDuplicateIndex(6)
    start = time.perf_counter()
    for i, h in enumerate(hashes):
        index.find(h)
        index.add(h, key=i)
    elapsed = time.perf_counter() - start
    print(f"\nNearDuplicateIndex(6): 200,000 x (find + add) of random hashes in {elapsed:.2f} s "
          f"({elapsed / 200_000 * 1e6:.1f} us per sample)")


def test_deduplicator_exact_near_and_preload():
    dedup = Deduplicator(max_distance=4)
    h = 0x0123_4567_89AB_CDEF
    assert dedup.check("c1", h, "a") is None
    assert dedup.check("c1", h ^ 0xFFFF, "b") == "duplicate_exact"  # exact wins whatever the pHash
    assert dedup.check("c2", h ^ 0b111, "c") == "duplicate_near"  # 3 bits away
    assert dedup.check("c2", h ^ 0b111, "c") == "duplicate_near"  # a dropped sample was not registered
    assert dedup.check("c3", h ^ 0b11111, "d") is None  # 5 bits away: new
    assert dedup.check("c4", None, "e") is None  # no pHash: exact check only, registered
    assert dedup.check("c4", 12345, "f") == "duplicate_exact"
    assert len(dedup) == 3

    resumed = Deduplicator(max_distance=4)
    resumed.preload([("c1", h), ("c9", None), ("c1", h)])
    assert len(resumed) == 2
    assert resumed.check("c1", 0, "x") == "duplicate_exact"
    assert resumed.check("c9", 0, "x") == "duplicate_exact"
    assert resumed.check("new", h ^ 1, "x") == "duplicate_near"
    assert resumed.check("new", ~h & ((1 << 64) - 1), "x") is None


def test_deduplicator_without_near_detection():
    dedup = Deduplicator(max_distance=None)
    assert dedup.max_distance is None
    assert dedup.check("c1", 42, "a") is None
    assert dedup.check("c2", 42, "b") is None  # same pHash, other bytes: kept when near-dup is off
    assert dedup.check("c1", 7, "c") == "duplicate_exact"


def test_deduplicator_distance_zero_is_exact_phash():
    dedup = Deduplicator(max_distance=0)
    assert dedup.check("c1", 42, "a") is None
    assert dedup.check("c2", 42, "b") == "duplicate_near"
    assert dedup.check("c3", 43, "c") is None


def test_deduplicator_without_exact_detection_keys_on_phash_only():
    """`dedup.exact: false` with near detection on: no content hash is looked up or registered, so
    distinct images are all kept (they used to share the content hash None and all but the first
    were dropped as exact duplicates), and a preloaded cache adds pHashes only."""
    dedup = Deduplicator(max_distance=4, exact=False)
    h = 0x0123_4567_89AB_CDEF
    assert dedup.check(None, h, "a") is None
    assert dedup.check(None, ~h & ((1 << 64) - 1), "b") is None  # far: kept
    assert dedup.check(None, h ^ 0b11, "c") == "duplicate_near"
    assert len(dedup) == 2

    resumed = Deduplicator(max_distance=4, exact=False)
    resumed.preload([("c1", h), ("c2", None)])
    assert resumed.check(None, ~h & ((1 << 64) - 1), "x") is None  # the cache held h only
    assert resumed.check("c1", h ^ 1, "y") == "duplicate_near"
    with pytest.raises(ValueError, match="exact"):
        Deduplicator(max_distance=None, exact=False)
