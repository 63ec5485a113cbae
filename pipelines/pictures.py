"""Pictures a person looks at, rather than figures: generated images beside the real ones, with captions.

Used by the demo (runs/demo/samples.png), by the registered decoders' images and by Stage C's
validation during training (a sample grid in MLflow at every validation, when the run has decoders;
importing this module does not import MLflow on the workers)."""

import textwrap

import numpy as np

CELL = 96  # px a side for each picture in a grid
CAPTION_LINES = 2


def to_uint8_images(images) -> np.ndarray:
    """(N, 3, H, W) tensor in [0, 1] -> uint8 (N, H, W, 3)."""
    import torch

    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def captioned_grid(captions: list[str], columns: list[np.ndarray], headers: list[str] | None = None,
                   per_row: int = 8, cell: int = CELL) -> np.ndarray:
    """A grid of tiles, one per caption: each tile holds the caption's pictures side by side (e.g.
    the real image and the generated one: `columns` are uint8 (N, H, W, 3) arrays, one per kind of
    picture, in caption order) with the caption under them; `headers` name the kinds (written once,
    at the top). Returns uint8 (H, W, 3)."""
    from PIL import Image, ImageDraw

    if not columns or any(len(c) != len(captions) for c in columns):
        raise ValueError(f"{len(captions)} captions and picture columns of lengths {[len(c) for c in columns]}")
    font_height = 11
    tile_w, tile_h = cell * len(columns) + 4, cell + font_height * CAPTION_LINES + 6
    rows = -(-len(captions) // per_row)
    top = font_height + 6 if headers else 0
    canvas = Image.new("RGB", (tile_w * min(per_row, len(captions)), top + tile_h * rows), "white")
    draw = ImageDraw.Draw(canvas)
    if headers:
        draw.text((4, 2), " | ".join(headers) + " (in each tile, left to right)", fill="black")
    for i, caption in enumerate(captions):
        x, y = (i % per_row) * tile_w, top + (i // per_row) * tile_h
        for j, pictures in enumerate(columns):
            picture = Image.fromarray(np.asarray(pictures[i], dtype=np.uint8)).resize((cell, cell), Image.Resampling.BILINEAR)
            canvas.paste(picture, (x + 2 + j * cell, y + 2))
        lines = textwrap.wrap(caption, width=max(8, tile_w // 6))[:CAPTION_LINES]
        for k, line in enumerate(lines):
            draw.text((x + 2, y + cell + 4 + k * font_height), line, fill="black")
    return np.asarray(canvas)
