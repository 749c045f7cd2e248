"""The Python SDK of Sfumato's REST API: :class:`Client` (blocking) and :class:`AsyncClient`.

```python
from sfumato.clients import Client

with Client("http://127.0.0.1:8080", api_key="sfm_...") as client:
    images = client.generate("an orange circle on a green background", num_images=2, seed=7)
    images[0].save("circle.png")
```

Both clients speak the API with the API's own pydantic models (``GenerationCreate``,
``GenerationOut``, ... from :mod:`sfumato.control_plane.schemas`, derived from the generation
contract :mod:`sfumato.serving.contract`): a request is checked here before it is sent and every
answer is parsed into the same type the server produced it from. Importing them needs pydantic
and numpy only (no FastAPI, no SQLAlchemy): ``pip install 'sfumato[client]'``.

What every call does:

* **Authentication**: an API key (``api_key=``, default ``$SFUMATO_API_KEY``) or a JWT from
  :meth:`Client.login` (user name and password; renewed before it expires).
* **Retries** (:class:`RetryPolicy`): 429 and 503 answers and connection failures are retried
  with exponential backoff and full jitter, waiting at least the server's ``Retry-After``. A
  failure after the request may have reached the server (a read timeout, a dropped connection)
  is retried only where that is safe: reads, deletes, and submissions, which carry an
  ``Idempotency-Key`` (the same key on every try), so a retry never makes a second job.
* **Errors**: an error answer (RFC 9457 problem details) raises the class of
  :mod:`sfumato.errors` that the server mapped to that status: :class:`~sfumato.errors.UsageError`
  (422, ``field`` names the bad field), :class:`~sfumato.errors.AuthenticationError` (401),
  :class:`~sfumato.errors.NotFoundError` (404), :class:`~sfumato.errors.RateLimitedError` (429,
  ``retry_after``), :class:`~sfumato.errors.ServiceUnavailableError` (503, and a server that
  cannot be reached), ...; each carries ``status`` and the ``problem`` body. A generation that
  ends ``failed`` or ``canceled`` raises :class:`GenerationError`.
* **Pages**: list methods return iterators (``for g in client.generations(): ...``) that
  follow ``next_cursor`` page by page.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import httpx_sse
import tenacity
from httpx_sse import ServerSentEvent
from PIL import Image
from pydantic import BaseModel, TypeAdapter, ValidationError

from sfumato import errors
from sfumato.control_plane.schemas import (
    GenerationCreate,
    GenerationOut,
    GenerationPage,
    KeyCreated,
    KeyOut,
    ModelOut,
    ModelVersionOut,
    TokenResponse,
    UserOut,
)

__all__ = [
    "AsyncClient",
    "Client",
    "Generation",
    "GenerationError",
    "GenerationTimeout",
    "Progress",
    "RetryPolicy",
]

log = logging.getLogger("sfumato.clients")

#: A generation as the API answers it (``GET /v1/generations/{id}``).
Generation = GenerationOut
FINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
DEFAULT_URL = "http://127.0.0.1:8080"
#: The most ``Prefer: wait`` the server honours by default (``SFUMATO_MAX_WAIT_S``).
MAX_PREFER_WAIT_S = 60
T = TypeVar("T", bound=BaseModel)


# --------------------------------------------------------------------------- errors


class GenerationError(errors.SfumatoError):
    """A generation ended ``failed`` or ``canceled`` (``generation`` is its last state)."""

    def __init__(self, message: str, *, generation: GenerationOut | None = None) -> None:
        super().__init__(message)
        self.generation = generation


class GenerationTimeout(GenerationError, TimeoutError):
    """The generation did not finish within the caller's ``timeout`` (it was not canceled;
    ``generation`` is its last state, ``generation.id`` what to follow or cancel)."""


#: Problem status -> the class the server raised for it (``sfumato.errors``: one hierarchy).
_ERRORS: dict[int, type[errors.SfumatoError]] = {
    400: errors.BadRequestError,
    401: errors.AuthenticationError,
    403: errors.PermissionDeniedError,
    404: errors.NotFoundError,
    409: errors.ConflictError,
    413: errors.PayloadTooLargeError,
    422: errors.UsageError,
    429: errors.RateLimitedError,
    503: errors.ServiceUnavailableError,
}


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delay-seconds form; an HTTP date is read too), else None."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def error_from_response(response: httpx.Response) -> errors.SfumatoError:
    """The :mod:`sfumato.errors` exception for an error answer, from its problem+json body.

    ``str(exc)`` is the problem's ``detail``; ``exc.status`` the HTTP status, ``exc.problem``
    the body (``{}`` when it was not JSON); a 422/400 has ``field`` (the first field named in
    ``errors``), a 429 ``retry_after`` (seconds, from ``Retry-After``).
    """
    try:
        problem = response.json()
        if not isinstance(problem, dict):
            problem = {}
    except ValueError:
        problem = {}
    status = response.status_code
    detail = problem.get("detail") or problem.get("title") or f"{status} {response.reason_phrase}"
    cls = _ERRORS.get(status, errors.SfumatoError)
    if issubclass(cls, errors.UsageError):
        named = problem.get("errors") or [{}]
        field = named[0].get("field") if isinstance(named[0], dict) else None
        exc: errors.SfumatoError = cls(detail, field=field)
    elif cls is errors.RateLimitedError:
        exc = cls(detail, retry_after=round(_retry_after(response) or 0))
    else:
        exc = cls(detail)
        if cls is errors.SfumatoError:  # a status with no class of its own (500, 502, ...)
            exc.http_status = status
            exc.title = problem.get("title") or response.reason_phrase
    exc.status = status  # type: ignore[attr-defined]
    exc.problem = problem  # type: ignore[attr-defined]
    return exc


def _usage_error(exc: ValidationError) -> errors.UsageError:
    """A request that fails the API's own schema, before it is sent: 422's exception."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ())) or None
    message = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()
    )
    return errors.UsageError(message, field=field)


# --------------------------------------------------------------------------- retries


class _RetryableAnswer(Exception):
    """A 429 or 503 answer, raised inside the retry loop so that tenacity sees it."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"{response.status_code} {response.reason_phrase}")
        self.response = response
        self.retry_after = _retry_after(response)


#: Failures before the request reached the server: always safe to retry.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how long to retry a call.

    ``attempts`` tries in all; between them ``random.uniform(0, min(max_backoff_s, backoff_s *
    2**n))`` seconds ("full jitter"), or the server's ``Retry-After`` plus up to ``backoff_s``
    of jitter when it sent one. A ``Retry-After`` longer than ``max_retry_after_s`` is not
    waited for: the error is raised at once (its ``retry_after`` says when to come back).
    """

    attempts: int = 6
    backoff_s: float = 0.25
    max_backoff_s: float = 20.0
    max_retry_after_s: float = 90.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based)."""
        if retry_after is not None:
            return retry_after + random.uniform(0, self.backoff_s)
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))

    def retries(self, exc: BaseException, *, safe: bool) -> bool:
        """Whether ``exc`` (of a try) is worth another; ``safe``: the call may run twice."""
        if isinstance(exc, _RetryableAnswer):
            return exc.retry_after is None or exc.retry_after <= self.max_retry_after_s
        if isinstance(exc, _NOT_SENT):
            return True
        return safe and isinstance(exc, httpx.TransportError)

    def _tenacity(self, *, safe: bool, what: str) -> dict[str, Any]:
        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return self.delay(state.attempt_number, getattr(exc, "retry_after", None))

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            sleep = state.next_action.sleep if state.next_action else 0.0
            why = f"{type(exc).__name__}: {exc}" if not isinstance(exc, _RetryableAnswer) else str(exc)
            log.info("retrying %s in %.2f s (try %d failed: %s)", what, sleep, state.attempt_number, why)

        return {
            "stop": tenacity.stop_after_attempt(max(1, self.attempts)),
            "wait": wait,
            "retry": tenacity.retry_if_exception(lambda exc: self.retries(exc, safe=safe)),
            "before_sleep": before_sleep,
            "reraise": True,
        }


# --------------------------------------------------------------------------- progress


@dataclass(frozen=True, slots=True)
class Progress:
    """What a progress callback receives: the generation's ``status`` and ``progress`` (0..1),
    the denoising ``step`` of ``total`` when the worker streams steps, and on the steps that
    carry one (submit with ``preview_every=k``) the images as they stand: ``preview_png`` (the
    PNG, the images side by side) and :attr:`preview` (decoded)."""

    generation_id: str
    status: str
    progress: float
    step: int | None = None
    total: int | None = None
    preview_png: bytes | None = None

    @property
    def preview(self) -> Image.Image | None:
        """The preview as a PIL image (``num_images`` images side by side), or None."""
        return None if self.preview_png is None else _open_image(self.preview_png)

    @classmethod
    def of(cls, generation: GenerationOut) -> Progress:
        return cls(generation.id, generation.status, generation.progress)


ProgressCallback = Callable[[Progress], Any]
#: The generation event stream's path (Server-Sent Events: ``status``, ``progress``, ``completed``).
EVENTS_PATH = "/v1/generations/{id}/events"
#: Longest wait for the next event before reconnecting (the server comments every 15 s).
STREAM_READ_S = 30.0


def _read_event(generation_id: str, event: ServerSentEvent) -> tuple[Progress | None, GenerationOut | None]:
    """What one event of the stream says: progress to report, and the generation when the event
    carries it (``status``, ``completed``)."""
    if event.event == "progress":
        data = event.json()
        preview = data.get("preview")
        png = None
        if isinstance(preview, str) and preview.startswith("data:image/png;base64,"):
            png = base64.b64decode(preview.split(",", 1)[1])
        progress = float(data.get("progress") or 0)
        return Progress(generation_id, "running", progress, data.get("step"), data.get("total"), png), None
    if event.event in ("status", "completed"):
        generation = GenerationOut.model_validate(event.json())
        return Progress.of(generation), generation
    return None, None  # an event kind this client does not know: skipped


class _StreamState:
    """Where a followed stream stands: the last event id (``Last-Event-ID`` on reconnect), the
    failed connections in a row, the last progress reported."""

    def __init__(self, generation_id: str, timeout: float) -> None:
        self.generation_id = generation_id
        self.deadline = time.monotonic() + timeout
        self.last_id: str | None = None
        self.failures = 0
        self.reported: tuple[str, float, int | None] | None = None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def headers(self, auth: Mapping[str, str]) -> dict[str, str]:
        headers = {**auth, "Accept": "text/event-stream", "Cache-Control": "no-store"}
        if self.last_id is not None:
            headers["Last-Event-ID"] = self.last_id
        return headers

    def fresh(self, progress: Progress) -> bool:
        """Whether ``progress`` differs from the last one reported (duplicates are dropped)."""
        key = (progress.status, progress.progress, progress.step)
        if key == self.reported:
            return False
        self.reported = key
        return True

    def backoff(self, exc: BaseException, policy: RetryPolicy) -> float | None:
        """Seconds to wait before reconnecting, or None: give up (raise ``exc``)."""
        self.failures += 1
        if self.failures >= policy.attempts or not policy.retries(exc, safe=True):
            return None
        delay = policy.delay(self.failures, getattr(exc, "retry_after", None))
        log.info("reconnecting to the events of %s in %.2f s (%s)", self.generation_id, delay, exc)
        return max(0.0, min(delay, self.left()))

    def timed_out(self, generation: GenerationOut, timeout: float) -> GenerationTimeout:
        return GenerationTimeout(
            f"generation {generation.id} is still {generation.status} after {timeout:g} s",
            generation=generation,
        )


# --------------------------------------------------------------------------- shared plumbing


def _encode_image(value: Any, *, mode: str) -> str:
    """An image input (a PIL image, PNG/JPEG bytes, a path to such a file, or a ``uint8``
    array: ``[H, W, 3]`` image, ``[H, W]`` mask) as the base64 PNG/JPEG the API takes."""
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    elif isinstance(value, str | os.PathLike):
        data = Path(value).read_bytes()
    else:
        image = value if isinstance(value, Image.Image) else Image.fromarray(value)
        buffer = io.BytesIO()
        image.convert(mode).save(buffer, format="PNG")
        data = buffer.getvalue()
    return base64.b64encode(data).decode("ascii")


def generation_body(prompt: str, *, image: Any = None, mask: Any = None, **params: Any) -> dict[str, Any]:
    """The JSON body of ``POST /v1/generations``, checked against the API's ``GenerationCreate``
    (the contract's fields and bounds): a bad field raises :class:`~sfumato.errors.UsageError`
    naming it before anything is sent. ``None`` values are left out (the model's defaults)."""
    values = {k: v for k, v in params.items() if v is not None}
    if image is not None:
        values["image"] = _encode_image(image, mode="RGB")
    if mask is not None:
        values["mask"] = _encode_image(mask, mode="L")
    try:
        body = GenerationCreate.model_validate({"prompt": prompt, **values})
    except ValidationError as exc:
        raise _usage_error(exc) from None
    return body.model_dump(mode="json", exclude_none=True)


def _open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _page_params(params: Mapping[str, Any], cursor: str | None) -> dict[str, Any]:
    out = {k: v for k, v in params.items() if v is not None}
    if cursor:
        out["cursor"] = cursor
    return out


@dataclass(frozen=True, slots=True)
class _Page:
    """A cursor page (``items``, ``next_cursor``), from a page model or a plain JSON object."""

    items: list[Any]
    next_cursor: str | None

    @classmethod
    def of(cls, page: Any) -> _Page:
        if isinstance(page, Mapping):
            return cls(list(page.get("items") or []), page.get("next_cursor"))
        return cls(list(page.items), page.next_cursor)


_DICT_PAGE: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])


def _raise_if_unfinished_error(generation: GenerationOut) -> None:
    if generation.status != "succeeded":
        raise GenerationError(
            f"generation {generation.id} {generation.status}"
            + (f": {generation.error}" if generation.error else ""),
            generation=generation,
        )


class _Base:
    """Configuration, headers and request building shared by both clients (no I/O)."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        *,
        token: str | None,
        timeout: float,
        retry: RetryPolicy | None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("SFUMATO_API_URL") or DEFAULT_URL).rstrip("/")
        self._api_key = api_key if api_key is not None else os.environ.get("SFUMATO_API_KEY")
        self._token = token
        self._token_expires = float("inf")
        self._credentials: tuple[str, str] | None = None
        self.timeout = timeout
        self.retry = retry or RetryPolicy()

    def _auth_headers(self) -> dict[str, str]:
        secret = self._token or self._api_key
        return {"Authorization": f"Bearer {secret}"} if secret else {}

    def _needs_login(self) -> bool:
        return self._credentials is not None and time.monotonic() > self._token_expires

    def _logged_in(self, answer: TokenResponse) -> TokenResponse:
        self._token = answer.access_token
        # Renewed a minute (or a tenth of its life) before it expires.
        margin = min(60.0, answer.expires_in / 10)
        self._token_expires = time.monotonic() + answer.expires_in - margin
        return answer

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise error_from_response(response)
        return response

    def _failed(self, exc: BaseException, what: str) -> errors.SfumatoError:
        if isinstance(exc, _RetryableAnswer):
            return error_from_response(exc.response)
        return errors.ServiceUnavailableError(f"{what}: {type(exc).__name__}: {exc or 'no answer'}")


# --------------------------------------------------------------------------- the blocking client


class Client(_Base):
    """A blocking client of the REST API.

    ``Client(base_url, api_key=...)``: ``base_url`` defaults to ``$SFUMATO_API_URL`` (else
    ``http://127.0.0.1:8080``) and ``api_key`` to ``$SFUMATO_API_KEY``; or pass ``token=`` (a
    JWT), or call :meth:`login`. ``timeout`` is httpx's, per request; ``retry`` the
    :class:`RetryPolicy`; ``http_client`` an ``httpx.Client`` of your own (proxies, TLS, a
    transport) whose ``base_url`` is the API's, used as it is (and not closed by
    :meth:`close`). Close the client with :meth:`close` or use it as a context manager.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(base_url, api_key, token=token, timeout=timeout, retry=retry)
        self._http = http_client or httpx.Client(base_url=self.base_url, timeout=timeout)
        self._own_http = http_client is None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    # ------------------------------------------------------------------ plumbing

    def request(
        self,
        method: str,
        path: str,
        *,
        safe: bool | None = None,
        headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """One call with the client's authentication, retries and error mapping; the answer
        (2xx/3xx) or the :mod:`sfumato.errors` exception. ``safe``: whether the call may run
        twice (default: GET, HEAD, PUT, DELETE, OPTIONS, and any call with ``Idempotency-Key``)."""
        if self._needs_login():
            self._token_expires = float("inf")  # the login's own request does not log in again
            try:
                self.login(*self._credentials)  # type: ignore[misc]
            except BaseException:
                self._token_expires = 0.0  # the next call tries again
                raise
        extra = dict(headers or {})
        if safe is None:
            safe = method.upper() in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS") or "Idempotency-Key" in extra
        what = f"{method} {path}"
        try:
            for attempt in tenacity.Retrying(**self.retry._tenacity(safe=safe, what=what)):
                with attempt:
                    response = self._http.request(
                        method, path, headers={**self._auth_headers(), **extra}, **kwargs
                    )
                    if response.status_code in (429, 503):
                        raise _RetryableAnswer(response)
        except (_RetryableAnswer, httpx.TransportError) as exc:
            raise self._failed(exc, f"{what} at {self.base_url}") from exc
        return self._check(response)

    def _json(self, method: str, path: str, model: type[T] | TypeAdapter, **kwargs: Any) -> Any:
        data = self.request(method, path, **kwargs).json()
        return model.validate_python(data) if isinstance(model, TypeAdapter) else model.model_validate(data)

    def _pages(self, path: str, page: type[BaseModel] | None, params: Mapping[str, Any]) -> Iterator[Any]:
        """Every item of every page (``page``: the page's model; None: the items as dicts)."""
        cursor: str | None = None
        while True:
            answer = _Page.of(
                self._json("GET", path, page or _DICT_PAGE, params=_page_params(params, cursor))
            )
            yield from answer.items
            cursor = answer.next_cursor
            if not cursor:
                return

    # ------------------------------------------------------------------ authentication

    def login(self, username: str, password: str) -> TokenResponse:
        """Exchange a user name and password for a JWT (``POST /v1/auth/token``); the client
        then uses it instead of its API key, and logs in again before it expires."""
        answer = self._json(
            "POST", "/v1/auth/token", TokenResponse, json={"username": username, "password": password}
        )
        self._credentials = (username, password)
        return self._logged_in(answer)

    # ------------------------------------------------------------------ generations

    def submit(
        self,
        prompt: str,
        *,
        image: Any = None,
        mask: Any = None,
        wait: float = 0,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> GenerationOut:
        """``POST /v1/generations``: queue a generation; its state (``queued`` unless it
        finished within ``wait`` seconds: ``Prefer: wait``, at most the server's cap).

        ``params`` are the contract's fields (``negative_prompt``, ``num_images``, ``steps``,
        ``guidance_scale``, ``seed``, ``width``, ``height``, ``scheduler``, ``strength``);
        ``image`` (img2img) and ``mask`` (inpainting, white = repaint) take a PIL image, PNG or
        JPEG bytes, a file path or a ``uint8`` array. Every submission carries an
        ``Idempotency-Key`` (``idempotency_key``, else a fresh one), the same on each retry.
        """
        body = generation_body(prompt, image=image, mask=mask, **params)
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        if wait > 0:
            headers["Prefer"] = f"wait={max(1, round(wait))}"
        # The submission's wait must fit in the read timeout.
        timeout = httpx.Timeout(self.timeout, read=self.timeout + wait) if wait else httpx.USE_CLIENT_DEFAULT
        return self._json(
            "POST", "/v1/generations", GenerationOut, json=body, headers=headers, timeout=timeout
        )

    def generation(self, generation_id: str) -> GenerationOut:
        """``GET /v1/generations/{id}``."""
        return self._json("GET", f"/v1/generations/{generation_id}", GenerationOut)

    def generations(self, *, status: str | None = None, page_size: int = 20) -> Iterator[GenerationOut]:
        """Your generations, newest first, across every page (``status`` filters)."""
        return self._pages("/v1/generations", GenerationPage, {"status": status, "limit": page_size})

    def generations_page(
        self, *, cursor: str | None = None, limit: int = 20, status: str | None = None
    ) -> GenerationPage:
        """One page of :meth:`generations` (``next_cursor`` for the next)."""
        params = _page_params({"limit": limit, "status": status}, cursor)
        return self._json("GET", "/v1/generations", GenerationPage, params=params)

    def cancel(self, generation_id: str) -> GenerationOut:
        """``POST /v1/generations/{id}/cancel``: canceled at once when queued; a running one
        is stopped by its worker (its status turns ``canceled`` shortly after)."""
        return self._json("POST", f"/v1/generations/{generation_id}/cancel", GenerationOut)

    def retry_generation(self, generation_id: str) -> GenerationOut:
        """``POST /v1/generations/{id}/retry``: queue a failed or canceled one again (same seed)."""
        return self._json("POST", f"/v1/generations/{generation_id}/retry", GenerationOut)

    def delete(self, generation_id: str) -> None:
        """``DELETE /v1/generations/{id}``: the generation and its images."""
        self.request("DELETE", f"/v1/generations/{generation_id}")

    def wait(
        self, generation_id: str, *, timeout: float = 300.0, on_progress: ProgressCallback | None = None
    ) -> GenerationOut:
        """Follow a generation until it is final (succeeded, failed or canceled) and return it.

        Reads its event stream (``GET /v1/generations/{id}/events``, Server-Sent Events),
        calling ``on_progress`` on each ``status`` and ``progress`` event; a dropped stream is
        reopened with ``Last-Event-ID`` so that nothing is missed or repeated, after the
        :class:`RetryPolicy`'s backoff. :class:`GenerationTimeout` after ``timeout`` seconds.
        """
        state = _StreamState(generation_id, timeout)
        path = EVENTS_PATH.format(id=generation_id)
        while True:
            try:
                read = max(0.1, min(STREAM_READ_S, state.left()))
                with httpx_sse.connect_sse(
                    self._http,
                    "GET",
                    path,
                    headers=state.headers(self._auth_headers()),
                    timeout=httpx.Timeout(self.timeout, read=read),
                ) as source:
                    response = source.response
                    if response.status_code >= 400:
                        response.read()
                        if response.status_code in (429, 503):
                            raise _RetryableAnswer(response)
                        self._check(response)
                    for event in source.iter_sse():
                        state.last_id = event.id or state.last_id
                        state.failures = 0
                        progress, generation = _read_event(generation_id, event)
                        if progress is not None and on_progress is not None and state.fresh(progress):
                            on_progress(progress)
                        if generation is not None and generation.status in FINAL_STATUSES:
                            return generation
                        if state.left() <= 0:
                            break
                    else:
                        if state.left() > 0:  # closed before the end: reopen where it stopped
                            raise httpx.RemoteProtocolError("the event stream ended early")
            except (_RetryableAnswer, httpx.TransportError) as exc:
                if state.left() > 0:
                    delay = state.backoff(exc, self.retry)
                    if delay is None:
                        raise self._failed(exc, f"GET {path} at {self.base_url}") from exc
                    time.sleep(delay)
            if state.left() <= 0:
                raise state.timed_out(self.generation(generation_id), timeout)

    def image_bytes(self, generation: GenerationOut, index: int = 0) -> bytes:
        """The PNG of one image (the generation's parameters are in its text chunks)."""
        url = next(img.url for img in generation.images if img.index == index)
        return self.request("GET", url, follow_redirects=True).content

    def images(self, generation: GenerationOut) -> list[Image.Image]:
        """A finished generation's images, as PIL images (``image.info`` has the PNG's text:
        prompt, seed, ...)."""
        return [_open_image(self.image_bytes(generation, img.index)) for img in generation.images]

    def generate(
        self,
        prompt: str,
        *,
        image: Any = None,
        mask: Any = None,
        timeout: float = 300.0,
        on_progress: ProgressCallback | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> list[Image.Image]:
        """Generate and return the images: submit with ``Prefer: wait``, follow the generation
        until it is done (calling ``on_progress`` on each change), download the PNGs.

        ``params`` as in :meth:`submit`. Raises :class:`GenerationError` when it fails or is
        canceled, :class:`GenerationTimeout` after ``timeout`` seconds (the job goes on). An
        interrupt (Ctrl-C) while waiting cancels the job.
        """
        started = time.monotonic()
        # With a progress callback, answer at once and follow; else let the server hold the answer.
        wait = 0 if on_progress is not None else min(timeout, MAX_PREFER_WAIT_S)
        generation = self.submit(
            prompt, image=image, mask=mask, wait=wait, idempotency_key=idempotency_key, **params
        )
        try:
            if generation.status not in FINAL_STATUSES or on_progress is not None:
                left = max(0.0, timeout - (time.monotonic() - started))
                generation = self.wait(generation.id, timeout=left, on_progress=on_progress)
        except KeyboardInterrupt:
            with contextlib.suppress(errors.SfumatoError):
                self.cancel(generation.id)
            raise
        _raise_if_unfinished_error(generation)
        return self.images(generation)

    # ------------------------------------------------------------------ accounts and models

    def create_key(self, name: str = "") -> KeyCreated:
        """``POST /v1/keys``: a new API key for yourself (``.key`` is shown only here)."""
        return self._json("POST", "/v1/keys", KeyCreated, json={"name": name})

    def keys(self) -> list[KeyOut]:
        """``GET /v1/keys``: your API keys."""
        return self._json("GET", "/v1/keys", TypeAdapter(list[KeyOut]))

    def revoke_key(self, key_id: str) -> None:
        """``DELETE /v1/keys/{id}``."""
        self.request("DELETE", f"/v1/keys/{key_id}")

    def create_user(self, name: str, *, role: str = "member", password: str | None = None) -> UserOut:
        """``POST /v1/users`` (admin)."""
        body = {"name": name, "role": role} | ({"password": password} if password else {})
        return self._json("POST", "/v1/users", UserOut, json=body)

    def users(self) -> list[UserOut]:
        """``GET /v1/users`` (admin)."""
        return self._json("GET", "/v1/users", TypeAdapter(list[UserOut]))

    def create_user_key(self, user_id: str, name: str = "") -> KeyCreated:
        """``POST /v1/users/{id}/keys`` (admin): an API key for another user."""
        return self._json("POST", f"/v1/users/{user_id}/keys", KeyCreated, json={"name": name})

    def models(self) -> list[ModelOut]:
        """``GET /v1/models``: the registered models, their versions (status, lineage), limits
        and defaults."""
        return self._json("GET", "/v1/models", TypeAdapter(list[ModelOut]))

    def triton_models(self) -> list[dict[str, Any]]:
        """``GET /v1/triton/models`` (admin): Triton's own models and their state."""
        return self.request("GET", "/v1/triton/models").json()

    # ------------------------------------------------------------------ newer resources
    # Thin methods for the routes issues 10 (data sets, trainings, the model registry) and 11
    # (users, content, interactions, recommendations) name: JSON in, the API's JSON out (dicts),
    # until their pydantic models land beside ``control_plane/schemas.py``. A route that is not
    # served raises :class:`~sfumato.errors.NotFoundError` like any 404.

    def upload_dataset(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """``POST /v1/datasets``: a ``.zip`` of images and a ``metadata.jsonl``."""
        files = {"file": (Path(path).name, Path(path).read_bytes(), "application/zip")}
        return self.request("POST", "/v1/datasets", files=files).json()

    def datasets(self, *, page_size: int = 20) -> Iterator[dict[str, Any]]:
        """``GET /v1/datasets``, every page."""
        return self._pages("/v1/datasets", None, {"limit": page_size})

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        """``GET /v1/datasets/{id}``."""
        return self.request("GET", f"/v1/datasets/{dataset_id}").json()

    def delete_dataset(self, dataset_id: str) -> None:
        """``DELETE /v1/datasets/{id}``."""
        self.request("DELETE", f"/v1/datasets/{dataset_id}")

    def create_training(self, dataset_id: str, **params: Any) -> dict[str, Any]:
        """``POST /v1/trainings`` (``method``, ``steps``/``epochs``, ``learning_rate``, ...);
        the queued training. Sent with an ``Idempotency-Key``, retried only when not sent."""
        body = {"dataset_id": dataset_id} | {k: v for k, v in params.items() if v is not None}
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        return self.request("POST", "/v1/trainings", json=body, headers=headers, safe=False).json()

    def training(self, training_id: str) -> dict[str, Any]:
        """``GET /v1/trainings/{id}``."""
        return self.request("GET", f"/v1/trainings/{training_id}").json()

    def trainings(self, *, status: str | None = None, page_size: int = 20) -> Iterator[dict[str, Any]]:
        """``GET /v1/trainings``, every page."""
        return self._pages("/v1/trainings", None, {"status": status, "limit": page_size})

    def cancel_training(self, training_id: str) -> dict[str, Any]:
        """``POST /v1/trainings/{id}/cancel``."""
        return self.request("POST", f"/v1/trainings/{training_id}/cancel").json()

    def training_weights(self, training_id: str) -> bytes:
        """``GET /v1/trainings/{id}/weights``: the LoRA weights (a diffusers LoRA file)."""
        return self.request("GET", f"/v1/trainings/{training_id}/weights", follow_redirects=True).content

    def deploy_model(self, name: str, version: str | int) -> ModelVersionOut:
        """``POST /v1/models/{name}/versions/{version}/deploy`` (admin): the version new
        generations naming the model (or no model) get."""
        return self._json("POST", f"/v1/models/{name}/versions/{version}/deploy", ModelVersionOut)

    def rollback_model(self, name: str) -> ModelVersionOut:
        """``POST /v1/models/{name}/rollback`` (admin): deploy the version deployed before."""
        return self._json("POST", f"/v1/models/{name}/rollback", ModelVersionOut)

    def user(self, user_id: str = "me") -> dict[str, Any]:
        """``GET /v1/users/{id}`` (``me``: yourself)."""
        return self.request("GET", f"/v1/users/{user_id}").json()

    def update_user(self, user_id: str = "me", **fields: Any) -> dict[str, Any]:
        """``PUT /v1/users/{id}``."""
        return self.request("PUT", f"/v1/users/{user_id}", json=fields).json()

    def set_preferences(self, user_id: str = "me", **preferences: Any) -> dict[str, Any]:
        """``PUT /v1/users/{id}/preferences`` (``favorite_tags``, ``content_types``, ``settings``)."""
        return self.request("PUT", f"/v1/users/{user_id}/preferences", json=preferences).json()

    def interactions(
        self, user_id: str = "me", *, type: str | None = None, page_size: int = 20
    ) -> Iterator[dict[str, Any]]:
        """``GET /v1/users/{id}/interactions``, every page."""
        return self._pages(f"/v1/users/{user_id}/interactions", None, {"type": type, "limit": page_size})

    def content(self, *, page_size: int = 20, **filters: Any) -> Iterator[dict[str, Any]]:
        """``GET /v1/content`` (``content_type``, ``tag``, ``creator``, ``q``, ``sort``), every page."""
        return self._pages("/v1/content", None, {**filters, "limit": page_size})

    def publish(self, **fields: Any) -> dict[str, Any]:
        """``POST /v1/content``: ``generation_id`` (+ ``image_index``), or an upload (``image``
        as for :meth:`submit`, ``title``, ``prompt``, ``tags``)."""
        if fields.get("image") is not None and not isinstance(fields["image"], str):
            fields["image"] = _encode_image(fields["image"], mode="RGB")
        return self.request("POST", "/v1/content", json=fields).json()

    def content_item(self, content_id: str) -> dict[str, Any]:
        """``GET /v1/content/{id}``."""
        return self.request("GET", f"/v1/content/{content_id}").json()

    def update_content(self, content_id: str, **fields: Any) -> dict[str, Any]:
        """``PUT /v1/content/{id}``."""
        return self.request("PUT", f"/v1/content/{content_id}", json=fields).json()

    def delete_content(self, content_id: str) -> None:
        """``DELETE /v1/content/{id}``."""
        self.request("DELETE", f"/v1/content/{content_id}")

    def interact(self, content_id: str, type: str, **fields: Any) -> dict[str, Any]:
        """``POST /v1/interactions`` (``view``, ``like``, ``dislike``, ``download``, ``share``,
        ``rate`` with ``rating``; ``duration_s`` for a view)."""
        body = {"content_id": content_id, "type": type} | {k: v for k, v in fields.items() if v is not None}
        return self.request("POST", "/v1/interactions", json=body).json()

    def interaction(self, interaction_id: str) -> dict[str, Any]:
        """``GET /v1/interactions/{id}``."""
        return self.request("GET", f"/v1/interactions/{interaction_id}").json()

    def recommendations(self, user_id: str = "me", *, limit: int = 10) -> dict[str, Any]:
        """``GET /v1/users/{id}/recommendations``."""
        return self.request("GET", f"/v1/users/{user_id}/recommendations", params={"limit": limit}).json()

    def refresh_recommendations(self) -> dict[str, Any]:
        """``POST /v1/recommendations/generate`` (admin): refit now."""
        return self.request("POST", "/v1/recommendations/generate").json()

    def recommendation_feedback(self, recommendation_id: str, feedback: str) -> dict[str, Any]:
        """``PUT /v1/recommendations/{id}/feedback`` (``clicked``, ``dismissed``, ``liked``)."""
        path = f"/v1/recommendations/{recommendation_id}/feedback"
        return self.request("PUT", path, json={"feedback": feedback}).json()


# --------------------------------------------------------------------------- the asyncio client


class AsyncClient(_Base):
    """The :class:`Client`'s twin for asyncio: the same methods, awaited (``async for`` over
    the list methods), over an ``httpx.AsyncClient``."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(base_url, api_key, token=token, timeout=timeout, retry=retry)
        self._http = http_client or httpx.AsyncClient(base_url=self.base_url, timeout=timeout)
        self._own_http = http_client is None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        safe: bool | None = None,
        headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """See :meth:`Client.request`."""
        if self._needs_login():
            self._token_expires = float("inf")
            try:
                await self.login(*self._credentials)  # type: ignore[misc]
            except BaseException:
                self._token_expires = 0.0
                raise
        extra = dict(headers or {})
        if safe is None:
            safe = method.upper() in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS") or "Idempotency-Key" in extra
        what = f"{method} {path}"
        try:
            async for attempt in tenacity.AsyncRetrying(**self.retry._tenacity(safe=safe, what=what)):
                with attempt:
                    response = await self._http.request(
                        method, path, headers={**self._auth_headers(), **extra}, **kwargs
                    )
                    if response.status_code in (429, 503):
                        raise _RetryableAnswer(response)
        except (_RetryableAnswer, httpx.TransportError) as exc:
            raise self._failed(exc, f"{what} at {self.base_url}") from exc
        return self._check(response)

    async def _json(self, method: str, path: str, model: type[T] | TypeAdapter, **kwargs: Any) -> Any:
        data = (await self.request(method, path, **kwargs)).json()
        return model.validate_python(data) if isinstance(model, TypeAdapter) else model.model_validate(data)

    async def _pages(
        self, path: str, page: type[BaseModel] | None, params: Mapping[str, Any]
    ) -> AsyncIterator[Any]:
        cursor: str | None = None
        while True:
            data = await self._json("GET", path, page or _DICT_PAGE, params=_page_params(params, cursor))
            answer = _Page.of(data)
            for item in answer.items:
                yield item
            cursor = answer.next_cursor
            if not cursor:
                return

    async def login(self, username: str, password: str) -> TokenResponse:
        """See :meth:`Client.login`."""
        answer = await self._json(
            "POST", "/v1/auth/token", TokenResponse, json={"username": username, "password": password}
        )
        self._credentials = (username, password)
        return self._logged_in(answer)

    async def submit(
        self,
        prompt: str,
        *,
        image: Any = None,
        mask: Any = None,
        wait: float = 0,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> GenerationOut:
        """See :meth:`Client.submit`."""
        body = generation_body(prompt, image=image, mask=mask, **params)
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        if wait > 0:
            headers["Prefer"] = f"wait={max(1, round(wait))}"
        timeout = httpx.Timeout(self.timeout, read=self.timeout + wait) if wait else httpx.USE_CLIENT_DEFAULT
        return await self._json(
            "POST", "/v1/generations", GenerationOut, json=body, headers=headers, timeout=timeout
        )

    async def generation(self, generation_id: str) -> GenerationOut:
        """See :meth:`Client.generation`."""
        return await self._json("GET", f"/v1/generations/{generation_id}", GenerationOut)

    def generations(self, *, status: str | None = None, page_size: int = 20) -> AsyncIterator[GenerationOut]:
        """See :meth:`Client.generations` (``async for``)."""
        return self._pages("/v1/generations", GenerationPage, {"status": status, "limit": page_size})

    async def generations_page(
        self, *, cursor: str | None = None, limit: int = 20, status: str | None = None
    ) -> GenerationPage:
        """See :meth:`Client.generations_page`."""
        params = _page_params({"limit": limit, "status": status}, cursor)
        return await self._json("GET", "/v1/generations", GenerationPage, params=params)

    async def cancel(self, generation_id: str) -> GenerationOut:
        """See :meth:`Client.cancel`."""
        return await self._json("POST", f"/v1/generations/{generation_id}/cancel", GenerationOut)

    async def retry_generation(self, generation_id: str) -> GenerationOut:
        """See :meth:`Client.retry_generation`."""
        return await self._json("POST", f"/v1/generations/{generation_id}/retry", GenerationOut)

    async def delete(self, generation_id: str) -> None:
        """See :meth:`Client.delete`."""
        await self.request("DELETE", f"/v1/generations/{generation_id}")

    async def wait(
        self, generation_id: str, *, timeout: float = 300.0, on_progress: ProgressCallback | None = None
    ) -> GenerationOut:
        """See :meth:`Client.wait` (``on_progress`` may be a coroutine function)."""
        state = _StreamState(generation_id, timeout)
        path = EVENTS_PATH.format(id=generation_id)
        while True:
            try:
                read = max(0.1, min(STREAM_READ_S, state.left()))
                async with httpx_sse.aconnect_sse(
                    self._http,
                    "GET",
                    path,
                    headers=state.headers(self._auth_headers()),
                    timeout=httpx.Timeout(self.timeout, read=read),
                ) as source:
                    response = source.response
                    if response.status_code >= 400:
                        await response.aread()
                        if response.status_code in (429, 503):
                            raise _RetryableAnswer(response)
                        self._check(response)
                    async for event in source.aiter_sse():
                        state.last_id = event.id or state.last_id
                        state.failures = 0
                        progress, generation = _read_event(generation_id, event)
                        if progress is not None and on_progress is not None and state.fresh(progress):
                            result = on_progress(progress)
                            if asyncio.iscoroutine(result):
                                await result
                        if generation is not None and generation.status in FINAL_STATUSES:
                            return generation
                        if state.left() <= 0:
                            break
                    else:
                        if state.left() > 0:  # closed before the end: reopen where it stopped
                            raise httpx.RemoteProtocolError("the event stream ended early")
            except (_RetryableAnswer, httpx.TransportError) as exc:
                if state.left() > 0:
                    delay = state.backoff(exc, self.retry)
                    if delay is None:
                        raise self._failed(exc, f"GET {path} at {self.base_url}") from exc
                    await asyncio.sleep(delay)
            if state.left() <= 0:
                raise state.timed_out(await self.generation(generation_id), timeout)

    async def image_bytes(self, generation: GenerationOut, index: int = 0) -> bytes:
        """See :meth:`Client.image_bytes`."""
        url = next(img.url for img in generation.images if img.index == index)
        return (await self.request("GET", url, follow_redirects=True)).content

    async def images(self, generation: GenerationOut) -> list[Image.Image]:
        """See :meth:`Client.images`."""
        return [_open_image(await self.image_bytes(generation, img.index)) for img in generation.images]

    async def generate(
        self,
        prompt: str,
        *,
        image: Any = None,
        mask: Any = None,
        timeout: float = 300.0,
        on_progress: ProgressCallback | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> list[Image.Image]:
        """See :meth:`Client.generate`; cancelling the task while it waits cancels the job."""
        started = time.monotonic()
        wait = 0 if on_progress is not None else min(timeout, MAX_PREFER_WAIT_S)
        generation = await self.submit(
            prompt, image=image, mask=mask, wait=wait, idempotency_key=idempotency_key, **params
        )
        try:
            if generation.status not in FINAL_STATUSES or on_progress is not None:
                left = max(0.0, timeout - (time.monotonic() - started))
                generation = await self.wait(generation.id, timeout=left, on_progress=on_progress)
        except asyncio.CancelledError:
            with contextlib.suppress(errors.SfumatoError):
                await asyncio.shield(self.cancel(generation.id))
            raise
        _raise_if_unfinished_error(generation)
        return await self.images(generation)

    async def create_key(self, name: str = "") -> KeyCreated:
        """See :meth:`Client.create_key`."""
        return await self._json("POST", "/v1/keys", KeyCreated, json={"name": name})

    async def keys(self) -> list[KeyOut]:
        """See :meth:`Client.keys`."""
        return await self._json("GET", "/v1/keys", TypeAdapter(list[KeyOut]))

    async def revoke_key(self, key_id: str) -> None:
        """See :meth:`Client.revoke_key`."""
        await self.request("DELETE", f"/v1/keys/{key_id}")

    async def create_user(self, name: str, *, role: str = "member", password: str | None = None) -> UserOut:
        """See :meth:`Client.create_user`."""
        body = {"name": name, "role": role} | ({"password": password} if password else {})
        return await self._json("POST", "/v1/users", UserOut, json=body)

    async def users(self) -> list[UserOut]:
        """See :meth:`Client.users`."""
        return await self._json("GET", "/v1/users", TypeAdapter(list[UserOut]))

    async def create_user_key(self, user_id: str, name: str = "") -> KeyCreated:
        """See :meth:`Client.create_user_key`."""
        return await self._json("POST", f"/v1/users/{user_id}/keys", KeyCreated, json={"name": name})

    async def models(self) -> list[ModelOut]:
        """See :meth:`Client.models`."""
        return await self._json("GET", "/v1/models", TypeAdapter(list[ModelOut]))

    async def triton_models(self) -> list[dict[str, Any]]:
        """See :meth:`Client.triton_models`."""
        return (await self.request("GET", "/v1/triton/models")).json()

    # ------------------------------------------------------------------ newer resources
    # Thin methods for the routes issues 10 (data sets, trainings, the model registry) and 11
    # (users, content, interactions, recommendations) name: JSON in, the API's JSON out (dicts),
    # until their pydantic models land beside ``control_plane/schemas.py``. A route that is not
    # served raises :class:`~sfumato.errors.NotFoundError` like any 404.

    async def upload_dataset(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """``POST /v1/datasets``: a ``.zip`` of images and a ``metadata.jsonl``."""
        files = {"file": (Path(path).name, Path(path).read_bytes(), "application/zip")}
        return (await self.request("POST", "/v1/datasets", files=files)).json()

    def datasets(self, *, page_size: int = 20) -> AsyncIterator[dict[str, Any]]:
        """``GET /v1/datasets``, every page."""
        return self._pages("/v1/datasets", None, {"limit": page_size})

    async def dataset(self, dataset_id: str) -> dict[str, Any]:
        """``GET /v1/datasets/{id}``."""
        return (await self.request("GET", f"/v1/datasets/{dataset_id}")).json()

    async def delete_dataset(self, dataset_id: str) -> None:
        """``DELETE /v1/datasets/{id}``."""
        await self.request("DELETE", f"/v1/datasets/{dataset_id}")

    async def create_training(self, dataset_id: str, **params: Any) -> dict[str, Any]:
        """``POST /v1/trainings`` (``method``, ``steps``/``epochs``, ``learning_rate``, ...);
        the queued training. Sent with an ``Idempotency-Key``, retried only when not sent."""
        body = {"dataset_id": dataset_id} | {k: v for k, v in params.items() if v is not None}
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        return (await self.request("POST", "/v1/trainings", json=body, headers=headers, safe=False)).json()

    async def training(self, training_id: str) -> dict[str, Any]:
        """``GET /v1/trainings/{id}``."""
        return (await self.request("GET", f"/v1/trainings/{training_id}")).json()

    def trainings(self, *, status: str | None = None, page_size: int = 20) -> AsyncIterator[dict[str, Any]]:
        """``GET /v1/trainings``, every page."""
        return self._pages("/v1/trainings", None, {"status": status, "limit": page_size})

    async def cancel_training(self, training_id: str) -> dict[str, Any]:
        """``POST /v1/trainings/{id}/cancel``."""
        return (await self.request("POST", f"/v1/trainings/{training_id}/cancel")).json()

    async def training_weights(self, training_id: str) -> bytes:
        """``GET /v1/trainings/{id}/weights``: the LoRA weights (a diffusers LoRA file)."""
        return (
            await self.request("GET", f"/v1/trainings/{training_id}/weights", follow_redirects=True)
        ).content

    async def deploy_model(self, name: str, version: str | int) -> ModelVersionOut:
        """See :meth:`Client.deploy_model`."""
        return await self._json("POST", f"/v1/models/{name}/versions/{version}/deploy", ModelVersionOut)

    async def rollback_model(self, name: str) -> ModelVersionOut:
        """See :meth:`Client.rollback_model`."""
        return await self._json("POST", f"/v1/models/{name}/rollback", ModelVersionOut)

    async def user(self, user_id: str = "me") -> dict[str, Any]:
        """``GET /v1/users/{id}`` (``me``: yourself)."""
        return (await self.request("GET", f"/v1/users/{user_id}")).json()

    async def update_user(self, user_id: str = "me", **fields: Any) -> dict[str, Any]:
        """``PUT /v1/users/{id}``."""
        return (await self.request("PUT", f"/v1/users/{user_id}", json=fields)).json()

    async def set_preferences(self, user_id: str = "me", **preferences: Any) -> dict[str, Any]:
        """``PUT /v1/users/{id}/preferences`` (``favorite_tags``, ``content_types``, ``settings``)."""
        return (await self.request("PUT", f"/v1/users/{user_id}/preferences", json=preferences)).json()

    def interactions(
        self, user_id: str = "me", *, type: str | None = None, page_size: int = 20
    ) -> AsyncIterator[dict[str, Any]]:
        """``GET /v1/users/{id}/interactions``, every page."""
        return self._pages(f"/v1/users/{user_id}/interactions", None, {"type": type, "limit": page_size})

    def content(self, *, page_size: int = 20, **filters: Any) -> AsyncIterator[dict[str, Any]]:
        """``GET /v1/content`` (``content_type``, ``tag``, ``creator``, ``q``, ``sort``), every page."""
        return self._pages("/v1/content", None, {**filters, "limit": page_size})

    async def publish(self, **fields: Any) -> dict[str, Any]:
        """``POST /v1/content``: ``generation_id`` (+ ``image_index``), or an upload (``image``
        as for :meth:`submit`, ``title``, ``prompt``, ``tags``)."""
        if fields.get("image") is not None and not isinstance(fields["image"], str):
            fields["image"] = _encode_image(fields["image"], mode="RGB")
        return (await self.request("POST", "/v1/content", json=fields)).json()

    async def content_item(self, content_id: str) -> dict[str, Any]:
        """``GET /v1/content/{id}``."""
        return (await self.request("GET", f"/v1/content/{content_id}")).json()

    async def update_content(self, content_id: str, **fields: Any) -> dict[str, Any]:
        """``PUT /v1/content/{id}``."""
        return (await self.request("PUT", f"/v1/content/{content_id}", json=fields)).json()

    async def delete_content(self, content_id: str) -> None:
        """``DELETE /v1/content/{id}``."""
        await self.request("DELETE", f"/v1/content/{content_id}")

    async def interact(self, content_id: str, type: str, **fields: Any) -> dict[str, Any]:
        """``POST /v1/interactions`` (``view``, ``like``, ``dislike``, ``download``, ``share``,
        ``rate`` with ``rating``; ``duration_s`` for a view)."""
        body = {"content_id": content_id, "type": type} | {k: v for k, v in fields.items() if v is not None}
        return (await self.request("POST", "/v1/interactions", json=body)).json()

    async def interaction(self, interaction_id: str) -> dict[str, Any]:
        """``GET /v1/interactions/{id}``."""
        return (await self.request("GET", f"/v1/interactions/{interaction_id}")).json()

    async def recommendations(self, user_id: str = "me", *, limit: int = 10) -> dict[str, Any]:
        """``GET /v1/users/{id}/recommendations``."""
        return (
            await self.request("GET", f"/v1/users/{user_id}/recommendations", params={"limit": limit})
        ).json()

    async def refresh_recommendations(self) -> dict[str, Any]:
        """``POST /v1/recommendations/generate`` (admin): refit now."""
        return (await self.request("POST", "/v1/recommendations/generate")).json()

    async def recommendation_feedback(self, recommendation_id: str, feedback: str) -> dict[str, Any]:
        """``PUT /v1/recommendations/{id}/feedback`` (``clicked``, ``dismissed``, ``liked``)."""
        path = f"/v1/recommendations/{recommendation_id}/feedback"
        return (await self.request("PUT", path, json={"feedback": feedback})).json()
