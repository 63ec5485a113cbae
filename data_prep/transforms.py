"""Pixels as the encoders take them: a square center crop at the training resolution, and the
semantic compressor's copy of it at 0.75x (1024 -> 768 -> 24x24 latents; the size comes from
`stages.latents.semantic_image_size`, which the caller passes: importing `stages` here would load
torch into every decode worker)."""

import numpy as np
from PIL import Image


def center_crop_resize(image: Image.Image, side: int) -> Image.Image:
    """Resize so the shorter side is `side` (antialiased), then crop the centre square."""
    w, h = image.size
    scale = side / min(w, h)
    resized = image.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.Resampling.BICUBIC, reducing_gap=3.0)
    rw, rh = resized.size
    left, top = (rw - side) // 2, (rh - side) // 2
    return resized.crop((left, top, left + side, top + side))


def training_pixels(image: Image.Image, resolution: int, semantic_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(image at resolution, image at the semantic compressor's size (h, w)), uint8 HWC RGB."""
    crop = center_crop_resize(image, resolution)
    sem_h, sem_w = semantic_size
    semantic = crop.resize((sem_w, sem_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(crop, dtype=np.uint8), np.asarray(semantic, dtype=np.uint8)
