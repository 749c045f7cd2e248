"""The ``pipeline`` model's tensors: one table shared by the model, its ``config.pbtxt`` and the
clients, so that a new input is added in one place.

Datatypes are Triton's wire names (``BYTES``, ``INT32``, ...); scalar inputs are ``[1]`` per
request; every input but ``prompt`` is optional.
"""

from __future__ import annotations

MODEL = "pipeline"

SCALAR_INPUTS: dict[str, str] = {
    "prompt": "BYTES",
    "negative_prompt": "BYTES",
    "num_images": "INT32",
    "steps": "INT32",
    "guidance_scale": "FP32",
    "seed": "INT64",
    "width": "INT32",
    "height": "INT32",
    "scheduler": "BYTES",
    "strength": "FP32",
}
ARRAY_INPUTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "image": ("UINT8", (-1, -1, 3)),
    "mask": ("UINT8", (-1, -1)),
}
OUTPUTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "images": ("UINT8", (-1, -1, -1, 3)),
    "seeds": ("INT64", (-1,)),
}
OPTIONS: tuple[str, ...] = tuple(name for name in SCALAR_INPUTS if name != "prompt")


def python_type(datatype: str) -> type:
    """The Python type a scalar of ``datatype`` is read as."""
    if datatype == "BYTES":
        return str
    return float if datatype.startswith("FP") else int


def config_type(datatype: str) -> str:
    """``config.pbtxt``'s name for a wire datatype (``BYTES`` is ``TYPE_STRING`` there)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
