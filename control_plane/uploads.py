"""Image uploads (a generation's ``image`` and ``mask``): base64 PNG or JPEG from an untrusted
client, checked before it is decoded and decoded off the event loop.

In order, each failure naming the field:

1. the base64 text is larger than ``max_bytes`` once decoded: 413, before anything is decoded;
2. not base64: 422;
3. not a PNG or a JPEG by its header (Pillow is allowed no other format, so no other decoder
   ever sees the bytes): 422;
4. the pixel count in the header (PNG ``IHDR``, JPEG ``SOF``) is over ``max_pixels``: 422,
   before a pixel is decoded (a 65535×65535 1-bit PNG is 0.5 MB of text and 4 GB of pixels);
5. any error of the decoder on the pixel data (truncated, corrupt chunks, bad Huffman tables):
   422;
6. a side that is not a multiple of 8: 422.

The image is then converted (``RGB`` for an image, ``L`` for a mask) and re-encoded as the PNG
that the job keeps in the image store. Steps 2 to 6 run in a worker thread
(:func:`asyncio.to_thread`): a 4096² decode takes about a second, which on the event loop would
stall every other request, health checks included.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import struct
import zlib
from dataclasses import dataclass
from typing import Literal

from PIL import Image, UnidentifiedImageError

from sfumato.errors import PayloadTooLargeError, UsageError

FORMATS = ("PNG", "JPEG")
# What Pillow's PNG and JPEG decoders raise on malformed data (found by fuzzing them: truncated
# files are OSError, broken chunks SyntaxError, bad headers ValueError, and so on). These come
# from parsing the client's bytes, so each is the client's error; anything else is a bug and
# propagates.
DECODER_ERRORS = (
    OSError,  # includes PIL.UnidentifiedImageError and "image file is truncated"
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


@dataclass(frozen=True, slots=True)
class Upload:
    """A checked input image, re-encoded as PNG."""

    png: bytes
    width: int
    height: int


async def read_image(
    data: str, *, field: str, mode: Literal["RGB", "L"], max_bytes: int, max_pixels: int
) -> Upload:
    """Check and decode one base64 image (see the module's docstring), in a worker thread."""
    if len(data) > (max_bytes * 4) // 3 + 4:
        raise PayloadTooLargeError(f"{field}: larger than {max_bytes} bytes")
    return await asyncio.to_thread(_read, data, field, mode, max_pixels)


def _read(data: str, field: str, mode: str, max_pixels: int) -> Upload:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{field}: not valid base64", field=field) from None
    try:
        with Image.open(io.BytesIO(raw), formats=FORMATS) as img:
            # Only the header has been read so far.
            width, height = img.size
            if width * height > max_pixels:
                raise UsageError(
                    f"{field}: {width}x{height} is {width * height} pixels; the limit is {max_pixels}",
                    field=field,
                )
            if width % 8 or height % 8:
                raise UsageError(
                    f"{field}: {width}x{height} is not a multiple of 8 on each side", field=field
                )
            converted = img.convert(mode)
    except Image.DecompressionBombError:
        # Pillow's own, coarser check (twice its MAX_IMAGE_PIXELS) fires inside open(), before ours.
        raise UsageError(f"{field}: too many pixels (the limit is {max_pixels})", field=field) from None
    except UnidentifiedImageError:
        raise UsageError(f"{field}: not a PNG or JPEG image", field=field) from None
    except DECODER_ERRORS:
        raise UsageError(f"{field}: a corrupt or truncated PNG or JPEG image", field=field) from None
    buffer = io.BytesIO()
    # Fast compression: the PNG is an input kept only until the job has run.
    converted.save(buffer, format="PNG", compress_level=1)
    return Upload(png=buffer.getvalue(), width=width, height=height)
