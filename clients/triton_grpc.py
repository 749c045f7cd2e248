"""Calling the ``pipeline`` model directly over Triton's gRPC API (power users, the CLI).

A thin layer over ``tritonclient.grpc``: it only turns keyword arguments into the pipeline's
named input tensors, so everything here is also doable in ten lines of plain tritonclient
(see the README).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sfumato.errors import SfumatoError
from sfumato.serving.contract import ARRAY_INPUTS, MODEL, SCALAR_INPUTS


class TritonCallError(SfumatoError):
    """Triton answered the call with an error (its message names the problem)."""


class InvalidArgumentError(TritonCallError):
    """Triton rejected a field of the request; the message names it."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class Generation:
    images: np.ndarray  # uint8 [N, H, W, 3]
    seeds: np.ndarray  # int64 [N]


def pipeline_inputs(
    module: Any, *, image: np.ndarray | None = None, mask: np.ndarray | None = None, **fields: Any
) -> list:
    """``InferInput`` objects of ``module`` (``tritonclient.grpc`` or ``.grpc.aio``) for the fields given."""
    from tritonclient.utils import triton_to_np_dtype

    inputs = []
    for name, value in fields.items():
        if value is None:
            continue
        if name not in SCALAR_INPUTS:
            raise TypeError(f"unknown pipeline input {name!r}")
        datatype = SCALAR_INPUTS[name]
        array = np.array(
            [value.encode("utf-8") if isinstance(value, str) else value], dtype=triton_to_np_dtype(datatype)
        )
        tensor = module.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    for name, array in (("image", image), ("mask", mask)):
        if array is not None:
            datatype = ARRAY_INPUTS[name][0]
            array = np.ascontiguousarray(array, dtype=triton_to_np_dtype(datatype))
            tensor = module.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
    return inputs


def generate(url: str, prompt: str, *, timeout_s: float = 300.0, **options: Any) -> Generation:
    """Run one generation on the Triton at ``url`` (``host:port``, gRPC); blocks until done."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    try:
        result = client.infer(
            MODEL,
            pipeline_inputs(grpcclient, prompt=prompt, **options),
            outputs=[grpcclient.InferRequestedOutput("images"), grpcclient.InferRequestedOutput("seeds")],
            client_timeout=timeout_s,
        )
    except InferenceServerException as exc:
        kind = InvalidArgumentError if "INVALID_ARGUMENT" in str(exc.status()) else TritonCallError
        raise kind(f"Triton at {url}: {exc.message()}") from None
    finally:
        client.close()
    return Generation(images=result.as_numpy("images"), seeds=result.as_numpy("seeds"))
