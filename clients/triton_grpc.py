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
    """Triton answered a call with an error (its message names the problem).

    :func:`triton_error` is the one mapping from a gRPC status to these classes, shared by the
    command line, the control plane's Triton gateway and its workers. ``transient`` says whether
    the same call may succeed later unchanged; ``http_status`` is what the REST API answers.
    """

    http_status = 502
    title = "Triton error"
    transient = False

    def __init__(self, message: str, *, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code


class InvalidArgumentError(TritonCallError):
    """Triton rejected a field of the request; the message names it."""

    exit_code = 2
    http_status = 422
    title = "Invalid request"


class TritonUnavailableError(TritonCallError):
    """Triton is down, restarting, unreachable, or the model is not loaded (yet)."""

    http_status = 503
    title = "Service unavailable"
    transient = True


class TritonOverloadedError(TritonCallError):
    """Triton's queue for the model is full (its queue policy rejected the request)."""

    http_status = 503
    title = "Service unavailable"
    transient = True


class TritonDeadlineError(TritonCallError):
    """The call's deadline passed before Triton answered."""

    http_status = 504
    title = "Gateway timeout"
    transient = True


class TritonCancelledError(TritonCallError):
    """The call was cancelled (by the caller, or by Triton on shutdown)."""

    http_status = 499
    title = "Cancelled"


class TritonAccessError(TritonCallError):
    """The caller may not make this call: a bad API key at the gRPC edge, a restricted protocol
    without its header, or a model the edge does not pass."""

    exit_code = 2
    http_status = 403
    title = "Forbidden"


_BY_CODE: dict[str, type[TritonCallError]] = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "OUT_OF_RANGE": InvalidArgumentError,
    "FAILED_PRECONDITION": InvalidArgumentError,
    "UNAVAILABLE": TritonUnavailableError,
    "RESOURCE_EXHAUSTED": TritonOverloadedError,
    "DEADLINE_EXCEEDED": TritonDeadlineError,
    "CANCELLED": TritonCancelledError,
    "UNAUTHENTICATED": TritonAccessError,
    "PERMISSION_DENIED": TritonAccessError,
}


def status_name(exc: Exception) -> str:
    """``"UNAVAILABLE"``, ``"INVALID_ARGUMENT"``, ... of a tritonclient or grpc error."""
    status = exc.status() if callable(getattr(exc, "status", None)) else getattr(exc, "code", None)
    if callable(status):
        status = status()
    return str(status or "UNKNOWN").removeprefix("StatusCode.")


def triton_error(exc: Exception, *, url: str | None = None) -> TritonCallError:
    """The :class:`TritonCallError` for a failed call (``InferenceServerException`` or
    ``grpc.RpcError``): the one gRPC-status mapping of the project."""
    code = status_name(exc)
    message = exc.message() if callable(getattr(exc, "message", None)) else None
    if message is None and callable(getattr(exc, "details", None)):
        message = exc.details()
    message = message or str(exc)
    # A model that is not loaded answers UNAVAILABLE over gRPC on some paths and NOT_FOUND-like
    # text on others; both mean "not now", not "never".
    kind = _BY_CODE.get(code, TritonCallError)
    if code in {"NOT_FOUND", "UNKNOWN", "INTERNAL"} and "is not ready" in message:
        kind = TritonUnavailableError
    prefix = f"Triton at {url}: " if url else ""
    return kind(f"{prefix}{message}", code=code)


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


def auth_headers(api_key: str | None) -> dict[str, str] | None:
    """gRPC metadata carrying an API key (or access token) for the gRPC edge."""
    return {"authorization": f"Bearer {api_key}"} if api_key else None


def generate(
    url: str, prompt: str, *, timeout_s: float = 300.0, api_key: str | None = None, **options: Any
) -> Generation:
    """Run one generation on the Triton at ``url`` (``host:port``, gRPC; the gRPC edge with
    ``api_key``); blocks until done."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    try:
        result = client.infer(
            MODEL,
            pipeline_inputs(grpcclient, prompt=prompt, **options),
            outputs=[grpcclient.InferRequestedOutput("images"), grpcclient.InferRequestedOutput("seeds")],
            headers=auth_headers(api_key),
            client_timeout=timeout_s,
        )
    except InferenceServerException as exc:
        raise triton_error(exc, url=url) from None
    finally:
        client.close()
    return Generation(images=result.as_numpy("images"), seeds=result.as_numpy("seeds"))
