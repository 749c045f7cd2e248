"""Calling the ``pipeline`` and ``pipeline_stream`` models directly over Triton's gRPC API
(power users, the CLI, the control plane's workers).

A thin layer over ``tritonclient.grpc``: it turns keyword arguments into the contract's named
input tensors (``sfumato.serving.contract``) and responses into typed results, so everything
here is also doable in a few lines of plain tritonclient (see the README).

* :func:`generate`: one ``infer`` call to ``pipeline``; returns a :class:`Generation`.
* :func:`stream_generate` (sync, for the CLI) and :func:`astream_generate` (``tritonclient.grpc.aio``,
  for the control plane's workers): one ``stream_infer`` call to ``pipeline_stream``, yielding a
  :class:`Progress` per denoising step and the :class:`Generation` last. Closing the iterator
  early (or cancelling the task reading it) cancels the stream, and Triton stops the loop.

Errors are :class:`TritonCallError` subclasses from :func:`triton_error`, the one mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sfumato.errors import SfumatoError
from sfumato.serving import contract
from sfumato.serving.contract import MODEL, STREAM_MODEL


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


# An error response on a gRPC stream carries its message only, no status: the pipeline models
# start their messages with the status in words, and this reads it back.
_STREAM_MESSAGE_CODES = {
    "invalid argument:": "INVALID_ARGUMENT",
    "unavailable:": "UNAVAILABLE",
    "cancelled:": "CANCELLED",
    "internal error:": "INTERNAL",
}


def status_name(exc: Exception) -> str:
    """``"UNAVAILABLE"``, ``"INVALID_ARGUMENT"``, ... of a tritonclient or grpc error."""
    status = exc.status() if callable(getattr(exc, "status", None)) else getattr(exc, "code", None)
    if callable(status):
        status = status()
    if status is None and callable(getattr(exc, "message", None)):
        message = exc.message() or ""
        return next(
            (code for prefix, code in _STREAM_MESSAGE_CODES.items() if message.startswith(prefix)), "UNKNOWN"
        )
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
    # A restricted protocol called without its header answers UNAVAILABLE over gRPC; it is a
    # refusal, not an outage.
    if "protocol is restricted" in message:
        kind = TritonAccessError
    prefix = f"Triton at {url}: " if url else ""
    return kind(f"{prefix}{message}", code=code)


@dataclass(frozen=True, slots=True)
class Generation:
    """The result: ``images`` uint8 ``[N, H, W, 3]``, ``seeds`` int64 ``[N]``, and the version
    of the model that drew them."""

    images: np.ndarray
    seeds: np.ndarray
    model_version: str = ""


@dataclass(frozen=True, slots=True)
class Progress:
    """``pipeline_stream``: ``step`` of ``total`` denoising steps done; ``preview`` (uint8
    ``[N, H, W, 3]``) every ``preview_every`` steps when asked."""

    step: int
    total: int
    preview: np.ndarray | None = None


Event = Progress | Generation


def _wire_value(field: contract.Field, value: Any) -> np.ndarray:
    """One value as its wire tensor; a value the wire type cannot hold is an invalid argument
    here (numpy would wrap 2**32 + 5 to 5 in an INT32), not a different request there."""
    from tritonclient.utils import triton_to_np_dtype

    if field.is_array:
        return np.ascontiguousarray(value, dtype=triton_to_np_dtype(field.datatype))
    if field.datatype == "BYTES":
        try:
            return np.array([str(value).encode("utf-8")], dtype=np.object_)
        except UnicodeEncodeError:
            raise InvalidArgumentError(f"invalid argument: {field.name}: is not valid UTF-8") from None
    low, high = contract.WIRE_INT_RANGE.get(field.datatype, (None, None))
    if low is not None and not (isinstance(value, int | np.integer) and low <= value <= high):
        raise InvalidArgumentError(f"invalid argument: {field.name}: {value!r} is not a {field.datatype}")
    return np.array([value], dtype=triton_to_np_dtype(field.datatype))


def pipeline_inputs(module: Any, *, stream: bool = False, **fields: Any) -> list:
    """``InferInput`` objects of ``module`` (``tritonclient.grpc`` or ``.grpc.aio``) for the
    fields given (``None``: left out, the model's default) of ``pipeline``, or of
    ``pipeline_stream`` with ``stream=True``."""
    known = {f.name: f for f in contract.input_fields(stream=stream)}
    tensors = []
    for name, value in fields.items():
        if value is None:
            continue
        if name not in known:
            raise TypeError(f"unknown {STREAM_MODEL if stream else MODEL} input {name!r}")
        array = _wire_value(known[name], value)
        tensor = module.InferInput(name, list(array.shape), known[name].datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


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
    return Generation(
        images=result.as_numpy("images"),
        seeds=result.as_numpy("seeds"),
        model_version=str(result.get_response().model_version),
    )


def _event(result: Any) -> Event:
    """One ``pipeline_stream`` response as its event: the images (the last), or a step."""
    names = {output.name for output in result.get_response().outputs}
    if "images" in names:
        return Generation(
            images=result.as_numpy("images"),
            seeds=result.as_numpy("seeds"),
            model_version=str(result.get_response().model_version),
        )
    return Progress(
        step=int(result.as_numpy("step")[0]),
        total=int(result.as_numpy("total")[0]),
        preview=result.as_numpy("preview") if "preview" in names else None,
    )


def stream_generate(
    url: str,
    prompt: str,
    *,
    timeout_s: float = 300.0,
    preview_every: int | None = None,
    request_id: str = "",
    headers: Mapping[str, str] | None = None,
    **options: Any,
) -> Iterator[Event]:
    """Stream one generation from ``pipeline_stream`` at ``url``: a :class:`Progress` per step,
    then the :class:`Generation`. Closing the iterator early cancels the request in Triton."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    inputs = pipeline_inputs(grpcclient, stream=True, prompt=prompt, preview_every=preview_every, **options)
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    finished = False
    closer: threading.Thread | None = None
    try:
        try:
            client.start_stream(
                callback=lambda result, error: responses.put((result, error)),
                stream_timeout=timeout_s,
                headers=dict(headers or {}),
            )
            client.async_stream_infer(STREAM_MODEL, inputs, request_id=request_id)
        except InferenceServerException as exc:  # the stream failed at once (its cause: the callback's)
            finished = True
            with contextlib.suppress(queue.Empty):
                exc = responses.get(timeout=5)[1] or exc
            raise triton_error(exc, url=url) from None
        # End our side of the stream now (the gRPC edge forwards a stream once the client has sent
        # all of it). ``stop_stream`` returns when the last response has been handed to the
        # callback, so it waits on a thread of its own while this one yields the responses.
        closer = threading.Thread(target=client.stop_stream, name="sfumato-stream-close", daemon=True)
        closer.start()
        while True:
            try:
                # The stream's own deadline (stream_timeout) answers first; this is the backstop.
                result, error = responses.get(timeout=timeout_s + 30)
            except queue.Empty:
                raise TritonDeadlineError(f"Triton at {url}: no response in {timeout_s + 30:.0f} s") from None
            if error is not None:
                finished = True
                raise triton_error(error, url=url)
            event = _event(result)
            yield event
            if isinstance(event, Generation):
                finished = True
                return
    finally:
        if not finished:  # closed early (Ctrl-C, break, an error): cancel the request in Triton
            with contextlib.suppress(AttributeError):  # the closer may have ended the stream already
                client.stop_stream(cancel_requests=True)
        if closer is not None:
            closer.join(timeout=30)
        client.close()


def _after_deadline(failure: TritonCallError, started: float, timeout_s: float) -> TritonCallError:
    """``failure``, or a :class:`TritonDeadlineError` when the stream's deadline had passed and the
    failure does not say more: Triton cancels the request then, and the model's "cancelled"
    answer (or gRPC's own CANCELLED, UNKNOWN or INTERNAL "Internal error from Core" of a stream
    torn down mid-way, seen on a busy machine) can reach us before the stream's own
    DEADLINE_EXCEEDED."""
    vague = isinstance(failure, TritonCancelledError) or failure.code in {"CANCELLED", "UNKNOWN", "INTERNAL"}
    if vague and time.monotonic() - started >= timeout_s:
        return TritonDeadlineError(
            f"deadline of {timeout_s} s exceeded ({failure})", code="DEADLINE_EXCEEDED"
        )
    return failure


async def _stream_ended(responses: Any, timeout_s: float = 5.0) -> bool:
    """Read a gRPC stream to its end (what is left after the final response); False when it
    did not end in ``timeout_s`` or failed, and must be cancelled."""
    try:
        async with asyncio.timeout(timeout_s):
            async for _ in responses:
                pass
    except Exception:  # TimeoutError, or the stream failed after all
        return False
    return True


async def astream_generate(
    client: Any,
    prompt: str,
    *,
    timeout_s: float = 300.0,
    preview_every: int | None = None,
    request_id: str = "",
    headers: Mapping[str, str] | None = None,
    model: str = STREAM_MODEL,
    model_version: str = "",
    **options: Any,
) -> AsyncIterator[Event]:
    """:func:`stream_generate` on a ``tritonclient.grpc.aio.InferenceServerClient`` (``model``:
    a streaming pipeline, ``model_version`` one of its versions, Triton's choice when empty).
    Cancelling the task that reads it (or closing it early) cancels the gRPC stream, and so the
    request."""

    import tritonclient.grpc.aio as aio

    inputs = pipeline_inputs(aio, stream=True, prompt=prompt, preview_every=preview_every, **options)

    async def requests() -> AsyncIterator[dict]:
        # One request, then the end of our side (the gRPC edge forwards a stream once the client
        # has sent all of it); Triton goes on streaming the responses.
        yield {
            "model_name": model,
            "model_version": model_version,
            "inputs": inputs,
            "request_id": request_id,
        }

    ended = False
    try:
        started = time.monotonic()
        responses = client.stream_infer(requests(), stream_timeout=timeout_s, headers=dict(headers or {}))
    except Exception as exc:
        raise triton_error(exc) from None
    try:
        while True:
            try:
                result, error = await responses.__anext__()
            except StopAsyncIteration:
                raise TritonUnavailableError("the stream ended before the final response") from None
            except Exception as exc:  # grpc.aio.AioRpcError: the whole stream failed
                raise _after_deadline(triton_error(exc), started, timeout_s) from None
            if error is not None:  # the model's error is its final response: the stream ends too
                failure = triton_error(error)
                ended = await _stream_ended(responses)
                raise _after_deadline(failure, started, timeout_s)
            event = _event(result)
            if isinstance(event, Generation):
                # Let the stream end on its own (Triton ends it right after the final response)
                # rather than cancel it: Triton 2.51 can keep a decoupled model "live" for good
                # after a stream cancelled past its final response, and then cannot unload it.
                ended = await _stream_ended(responses)
                yield event
                return
            yield event
    finally:
        if not ended:
            responses.cancel()
