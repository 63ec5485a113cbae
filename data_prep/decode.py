"""Decoding that survives web data: every failure becomes a `DecodeError` with a named reason.

Web-scraped image-text pairs are full of broken samples: HTML saved as `.jpg`, downloads cut short,
pixel bombs, captions in Latin-1. One such sample must never take a shard (or a job) down with it,
and it must never vanish silently either: it is dropped with a reason from `DropReason`, and the
pipeline counts the reasons. `ray.data.read_webdataset`'s default decoder does neither (it fails
the whole shard on one such sample), which is why the readers hand raw bytes on and decoding
happens here.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError


class DropReason:
    """The reason names that reading and decoding give a dropped sample (plain strings, so that
    they travel through Arrow/Ray columns and count with `collections.Counter`)."""

    NOT_AN_IMAGE = "not_an_image"  # bytes that no allowed image decoder accepts
    TRUNCATED_IMAGE = "truncated_image"  # an image whose data is cut short
    DECOMPRESSION_BOMB = "decompression_bomb"  # more pixels than the bound, refused before allocating
    MISSING_IMAGE = "missing_image"  # a sample with no image (or a null image cell)
    MISSING_CAPTION = "missing_caption"  # no caption, or one that is empty after whitespace clean-up
    CAPTION_NOT_UTF8 = "caption_not_utf8"  # caption bytes that are not UTF-8
    UNSAFE_MEMBER_NAME = "unsafe_member_name"  # tar member with `..` components or an absolute path
    TRUNCATED_MEMBER = "truncated_member"  # tar member (or parquet rows) lost to a shard cut short
    UNREADABLE_SHARD = "unreadable_shard"  # a shard that cannot be opened at all


READ_DROP_REASONS: tuple[str, ...] = (
    DropReason.NOT_AN_IMAGE,
    DropReason.TRUNCATED_IMAGE,
    DropReason.DECOMPRESSION_BOMB,
    DropReason.MISSING_IMAGE,
    DropReason.MISSING_CAPTION,
    DropReason.CAPTION_NOT_UTF8,
    DropReason.UNSAFE_MEMBER_NAME,
    DropReason.TRUNCATED_MEMBER,
    DropReason.UNREADABLE_SHARD,
)

# PIL's own default bound (Image.MAX_IMAGE_PIXELS at import time), repeated here so that another
# module changing the global cannot change ours.
DEFAULT_MAX_PIXELS = 89_478_485

# The formats web image data comes in. The allow-list keeps exotic decoders away from untrusted
# bytes: EPS would start Ghostscript, and the rarely used plugins are where parser bugs live.
IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")

_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


class DecodeError(Exception):
    """A sample that cannot be used; `.reason` is one of `READ_DROP_REASONS`."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message


# -- images ----------------------------------------------------------------------------------------

def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> an RGB image, upright (EXIF orientation applied), alpha composited on white.

    Raises `DecodeError` with `not_an_image`, `truncated_image` or `decompression_bomb`. The pixel
    bound is checked on the header's size before any pixel is decoded. PIL's global
    `Image.MAX_IMAGE_PIXELS` still applies inside `Image.open` (it cannot be bypassed without
    changing global state): if another module lowered it, PIL's refusal is reported as
    `decompression_bomb` too; if another module raised or disabled it, `max_pixels` still holds.
    """
    if not data:
        raise DecodeError(DropReason.NOT_AN_IMAGE, "empty image bytes")
    image = _open_header(data, max_pixels)
    _load_pixels(image, data)
    image = _apply_exif_orientation(image)
    return _to_rgb(image)


def _open_header(data: bytes, max_pixels: int) -> Image.Image:
    """Identifies the format and reads the header only (PIL's open is lazy), then checks the
    declared pixel count against our own bound, so a bomb is refused before it is allocated."""
    try:
        image = Image.open(io.BytesIO(data), formats=_available_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # PIL's global bound fired first (the warning is raised only under a `-W error` filter).
        raise DecodeError(DropReason.DECOMPRESSION_BOMB, str(err)) from None
    except UnidentifiedImageError:
        raise DecodeError(DropReason.NOT_AN_IMAGE, "no allowed image format recognises these bytes") from None
    except Exception as err:  # noqa: BLE001 - a plugin parsing a broken header may raise anything
        raise _load_failure(err, data) from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise DecodeError(DropReason.NOT_AN_IMAGE, f"image header declares size {width}x{height}")
    if width * height > max_pixels:
        raise DecodeError(
            DropReason.DECOMPRESSION_BOMB, f"{width}x{height} = {width * height} pixels > bound {max_pixels}"
        )
    return image


@functools.cache
def _available_formats() -> tuple[str, ...]:
    """IMAGE_FORMATS that this Pillow build can open (`Image.open` fails on an unknown name)."""
    Image.init()
    return tuple(name for name in IMAGE_FORMATS if name in Image.OPEN)


def _load_pixels(image: Image.Image, data: bytes) -> None:
    """Decodes the pixels. A cut image must fail rather than come back padded with grey: we never
    set `ImageFile.LOAD_TRUNCATED_IMAGES`, and if another module did, the container check below
    still catches what PIL then lets through."""
    try:
        image.load()
    except Exception as err:  # noqa: BLE001 - decoders raise OSError, ValueError, SyntaxError, ...
        raise _load_failure(err, data) from None
    if ImageFile.LOAD_TRUNCATED_IMAGES and _container_cut_short(data):
        raise DecodeError(DropReason.TRUNCATED_IMAGE, "image data ends early (decoded only because "
                          "ImageFile.LOAD_TRUNCATED_IMAGES was set elsewhere)")


def _load_failure(err: Exception, data: bytes) -> DecodeError:
    """An image decoder failed: cut short if PIL says so or the container is visibly incomplete,
    otherwise not a decodable image."""
    message = f"{type(err).__name__}: {err}"
    if "truncated" in str(err).lower() or _container_cut_short(data):
        return DecodeError(DropReason.TRUNCATED_IMAGE, message)
    return DecodeError(DropReason.NOT_AN_IMAGE, message)


def _container_cut_short(data: bytes) -> bool:
    """True when the bytes start like a JPEG/PNG/WebP but lack what a complete file ends with.
    Needed because some decoders do not say "truncated" (libwebp: "could not create decoder")."""
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        declared = int.from_bytes(data[4:8], "little") + 8
        return len(data) < declared
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return b"IEND" not in data[-64:]
    if data.startswith(b"\xff\xd8"):
        return b"\xff\xd9" not in data[-64:]
    return False


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotates/flips per the EXIF Orientation tag. The pixels are already decoded and good, so a
    malformed EXIF block costs the rotation, not the sample."""
    try:
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of upright images
    except Exception:  # noqa: BLE001 - malformed EXIF can raise from several places in PIL
        pass
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency (alpha band or palette/colour-key transparency)
    is composited on white, which is what a viewer shows and what the captions describe."""
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        return _high_bit_depth_to_l(image).convert("RGB")
    if "transparency" in image.info and image.mode in ("P", "L", "RGB", "1"):
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES or (image.mode == "P" and image.palette and image.palette.mode == "RGBA"):
        return _composite_on_white(image.convert("RGBA"))
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise DecodeError(DropReason.NOT_AN_IMAGE, f"cannot convert mode {image.mode} to RGB: {err}") from None


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit grey -> 8-bit grey by scaling, not clipping (PIL's own `convert` clips
    I;16 at 255, turning a 16-bit photo almost white)."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        values = values / 257.0
    elif image.mode == "I" and values.max(initial=0) > 255:
        values = values / 257.0  # what PIL decodes 16-bit files to in mode I
    elif image.mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0  # float images are conventionally in [0, 1]
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


# -- captions --------------------------------------------------------------------------------------

def decode_caption(data: bytes | str | None) -> str:
    """Caption bytes or text -> one clean line: UTF-8 (a leading BOM dropped), runs of whitespace
    (newlines, tabs, NBSP, ...) collapsed to one space, ends stripped.

    Raises `DecodeError` with `missing_caption` (None, or nothing left after clean-up) or
    `caption_not_utf8` (bytes that are not UTF-8, or text holding lone surrogates, which no
    UTF-8 writer downstream would accept).
    """
    if data is None:
        raise DecodeError(DropReason.MISSING_CAPTION, "no caption")
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = bytes(data).decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise DecodeError(DropReason.CAPTION_NOT_UTF8, str(err)) from None
    elif isinstance(data, str):
        text = data.removeprefix("\ufeff")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise DecodeError(DropReason.CAPTION_NOT_UTF8, str(err)) from None
    else:
        raise TypeError(f"caption must be bytes, str or None, got {type(data).__name__}")
    text = " ".join(text.split())
    if not text:
        raise DecodeError(DropReason.MISSING_CAPTION, "caption is empty")
    return text
