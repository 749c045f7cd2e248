"""Build data set zips for the tests: good ones, and every kind of bad one."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np

from sfumato.clients.png import encode_png
from sfumato.shapes import make_finetune_dataset


def png(colour: tuple[int, int, int] = (255, 105, 180), size: int = 32) -> bytes:
    return encode_png(np.full((size, size, 3), colour, dtype=np.uint8))


def make_zip(
    files: dict[str, bytes] | None = None,
    metadata: list[dict] | str | None = None,
    *,
    compression: int = zipfile.ZIP_DEFLATED,
) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in (files or {}).items():
            archive.writestr(name, data)
        if metadata is not None:
            text = metadata if isinstance(metadata, str) else "".join(json.dumps(m) + "\n" for m in metadata)
            archive.writestr("metadata.jsonl", text)
    return buffer.getvalue()


def shapes_zip(count: int = 8, *, seed: int = 0) -> bytes:
    """A small pink fine-tune data set (images of the shapes grammar, pink among them)."""
    images, captions = make_finetune_dataset(count, seed=seed)
    files = {f"img/{i}.png": encode_png(image) for i, image in enumerate(images)}
    return make_zip(files, [{"file_name": f"img/{i}.png", "text": c} for i, c in enumerate(captions)])
