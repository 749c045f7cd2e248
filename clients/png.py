"""PNG encoding with the generation's parameters in text chunks (clients and control plane)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin


def encode_png(image: np.ndarray, *, text: dict[str, str] | None = None) -> bytes:
    """``uint8 [H, W, 3]`` -> PNG bytes, each ``text`` item a tEXt/iTXt chunk."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, str(value))
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8), mode="RGB").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def output_paths(path: Path, count: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png``, ``out-1.png``, ... for several."""
    path = Path(path)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(count)]


def read_image(path: Path, *, mode: str = "RGB") -> np.ndarray:
    """A PNG/JPEG file as ``uint8 [H, W, 3]`` (``mode="RGB"``) or ``[H, W]`` (``mode="L"``)."""
    with Image.open(path) as img:
        return np.asarray(img.convert(mode), dtype=np.uint8)
