"""Contact sheets: many small images in one PNG, for looking at samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def save_grid(images: np.ndarray, path: Path, *, columns: int = 8, scale: int = 2, pad: int = 2) -> Path:
    """Save ``uint8`` ``[N, H, W, 3]`` images as one PNG grid, each upscaled ``scale`` x."""
    images = np.asarray(images, dtype=np.uint8)
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    sheet = np.full((rows * cell_h + pad, columns * cell_w + pad, 3), 128, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        big = image.repeat(scale, axis=0).repeat(scale, axis=1)
        sheet[
            pad + r * cell_h : pad + r * cell_h + h * scale, pad + c * cell_w : pad + c * cell_w + w * scale
        ] = big
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path)
    return path
