"""Aspect-ratio buckets: the image shapes a cache holds, each with about the training resolution's
pixel count, and which one an image goes to.

A bucket is named "HxW" (pixels, height first). Its sides are multiples of SIDE_STRIDE, so that Stage
A (f4) and the semantic compressor's input (0.75x the side, on a multiple of 32) divide them; the
square RxR is always one. An image goes to the bucket whose aspect ratio is nearest to its own (in
log ratio: 2:1 and 1:2 are as far from 1:1), the first of two at the same distance, and is resized to
cover it and cut at the centre (no random crops: the latents are cached once).

No torch here: data prep's decode workers import this.
"""

import math

# Every bucket side is a multiple of this: stages.latents.IMAGE_SIZE_STEP, the semantic compressor's
# stride (not imported from there: that would load torch into every decode worker; a test holds them equal).
SIDE_STRIDE = 32
# "aspect": these shapes (width:height) and their transposes, 1:2 to 2:1 (StableCascade buckets on a
# similar list, its 12 ratios with reciprocals; more buckets split a small dataset's batches further).
ASPECT_RATIOS = ((1, 1), (5, 4), (4, 3), (3, 2), (16, 9), (2, 1))
SQUARE, ASPECT = "square", "aspect"


def name(height: int, width: int) -> str:
    return f"{height}x{width}"


def parse(bucket: str) -> tuple[int, int]:
    """(height, width) of a bucket name "HxW"."""
    try:
        height, width = (int(side) for side in bucket.split("x"))
    except ValueError:
        raise ValueError(f"a bucket is named HxW (pixels, height first), got {bucket!r}") from None
    return height, width


def aspect_buckets(resolution: int, ratios: tuple[tuple[int, int], ...] = ASPECT_RATIOS, stride: int = SIDE_STRIDE) -> list[str]:
    """The buckets of about resolution^2 pixels at each of `ratios` (width:height) and its reciprocal,
    sides rounded to multiples of `stride`, from the tallest to the widest."""
    out = set()
    for w, h in ratios:
        height = max(stride, round(resolution * math.sqrt(h / w) / stride) * stride)
        width = max(stride, round(resolution * math.sqrt(w / h) / stride) * stride)
        out |= {name(height, width), name(width, height)}
    return sorted(out, key=lambda b: parse(b)[1] / parse(b)[0])


def resolve(buckets: str | list[str], resolution: int) -> list[str]:
    """The bucket names an encode.buckets setting means: "square" (the square only), "aspect"
    (`aspect_buckets`), or its own list, checked: sides multiples of SIDE_STRIDE, the square among them,
    and each within a quarter of the square's pixel count."""
    if buckets == SQUARE:
        return [name(resolution, resolution)]
    if buckets == ASPECT:
        return aspect_buckets(resolution)
    if isinstance(buckets, str):
        raise ValueError(f"encode.buckets must be {SQUARE!r}, {ASPECT!r} or a list of HxW names, got {buckets!r}")
    for bucket in buckets:
        height, width = parse(bucket)
        if height % SIDE_STRIDE or width % SIDE_STRIDE:
            raise ValueError(f"encode.buckets: the sides of {bucket} must be multiples of {SIDE_STRIDE}")
        if not 0.75 <= height * width / resolution**2 <= 1.25:
            raise ValueError(f"encode.buckets: {bucket} has {height * width} pixels, not within a quarter of "
                             f"resolution^2 = {resolution**2}")
    if name(resolution, resolution) not in buckets:
        raise ValueError(f"encode.buckets must hold the square {name(resolution, resolution)}, got {list(buckets)}")
    if len(set(buckets)) != len(buckets):
        raise ValueError(f"encode.buckets names a bucket twice: {list(buckets)}")
    return sorted(buckets, key=lambda b: parse(b)[1] / parse(b)[0])


def nearest(buckets: list[str], height: int, width: int) -> str:
    """The bucket whose aspect ratio is nearest to that of a height x width image (in log ratio)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(parse(b)[1] / parse(b)[0]) - ratio))
