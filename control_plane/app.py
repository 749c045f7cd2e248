"""The FastAPI application factory.

``create_app(settings)`` wires settings, services (engine, image store, rate limiter,
metrics), the routers, problem-details errors and three ASGI middlewares, outermost first:

* :class:`RequestContext`: the request id (``X-Request-ID`` taken or made, and returned), the
  ``RateLimit-Policy`` / ``RateLimit`` fields of the policies the request charged, the metrics
  and the access log, and the last word on an unknown exception (logged with its traceback,
  answered as a problem 500 on a connection that stays usable);
* :class:`LoadShedder`: beyond ``SFUMATO_MAX_REQUESTS_IN_FLIGHT`` requests at once, a 503 with
  ``Retry-After`` at once rather than a queue that grows for minutes;
* :class:`BodySizeLimit`: 413 for a body over ``SFUMATO_MAX_BODY_BYTES``.

Its lifespan starts ``settings.workers`` in-process workers and the task that writes API keys'
last use (:mod:`key_usage`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sfumato import __version__
from sfumato.control_plane import logs, problems, ratelimit, recommendations, registry
from sfumato.control_plane.metrics import Metrics
from sfumato.control_plane.routers import (
    accounts,
    datasets,
    edge,
    gallery,
    generations,
    models,
    operations,
    trainings,
)
from sfumato.control_plane.routers import events as job_events
from sfumato.control_plane.routers import playground as playground_page
from sfumato.control_plane.routers import webhooks as webhook_routes
from sfumato.control_plane.services import Services
from sfumato.control_plane.settings import Settings, get_settings
from sfumato.control_plane.worker import run_workers

log = logging.getLogger("sfumato.api")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Never shed: the probes and the scrape (an overloaded service must still say so), job event
# streams (generations and trainings), which are long-lived and have their own rate budget, and
# the playground's static files (cheap; the page must load to tell its user that the API is busy).
_NOT_SHED = re.compile(
    r"^/(healthz|readyz|metrics)?$|^/v1/(generations|trainings)/[^/]+/events$|^/playground/"
)
SHED_RETRY_AFTER_S = 1

DESCRIPTION = """
Sfumato's control plane: submit text-to-image generations as durable jobs, follow them, and
download the images. Authenticate with `Authorization: Bearer <API key or access token>`.
Errors are RFC 9457 `application/problem+json`.
"""


class BodySizeLimit:
    """Reject request bodies over ``limit`` bytes with 413, whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp, *, limit: int, paths: dict[str, int] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.paths = paths or {}  # exact paths with a limit of their own (data set uploads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.paths.get(scope["path"], self.limit)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(scope, send, limit)
            return
        seen = 0
        too_large = False
        responder: str | None = None  # who answers: "app", or "limit" (our 413)

        async def limited_receive() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    too_large = True
                    raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
            # The app may catch the failed read and answer for itself (FastAPI turns any error
            # while reading a body into a 400): once the body went over the limit, the answer
            # is our 413 and whatever the app sends is dropped.
            nonlocal responder
            if responder is None:
                responder = "limit" if too_large else "app"
                if responder == "limit":
                    await self._reject(scope, send, limit)
            if responder == "app":
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            if responder is None:
                responder = "limit"
                await self._reject(scope, send, limit)
            elif responder == "app":  # the app had already started its own response
                raise

    async def _reject(self, scope: Scope, send: Send, limit: int) -> None:
        _count_rejection(scope, "body_size")
        body = problems.problem_body(413, "Payload too large", f"request body larger than {limit} bytes")
        await _send_problem(send, body)


class _TooLarge(Exception):
    pass


async def _send_problem(send: Send, body: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": body["status"],
            "headers": [
                (b"content-type", problems.PROBLEM_JSON.encode()),
                (b"content-length", str(len(data)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _services(scope: Scope) -> Services | None:
    app = scope.get("app")
    return getattr(app.state, "services", None) if app is not None else None


def _count_rejection(scope: Scope, limit: str) -> None:
    services = _services(scope)
    if services is not None:
        services.metrics.rejections.labels(limit=limit).inc()


class LoadShedder:
    """At most ``limit`` requests handled at once; beyond it 503 + ``Retry-After`` at once.

    A request over the limit costs a counter check and a short answer: no authentication, no
    database, no body read. Probes, metrics and event streams are not counted (``_NOT_SHED``);
    WebSockets are not HTTP requests and pass.
    """

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _NOT_SHED.match(scope["path"]):
            await self.app(scope, receive, send)
            return
        services = _services(scope)
        if self.in_flight >= self.limit:
            _count_rejection(scope, "load_shedding")
            body = problems.problem_body(
                503,
                "Service unavailable",
                f"overloaded: {self.limit} requests in flight; retry after {SHED_RETRY_AFTER_S} s",
            )
            await _send_problem(send, body, [(b"retry-after", str(SHED_RETRY_AFTER_S).encode())])
            return
        self.in_flight += 1
        if services is not None:
            services.metrics.in_flight.set(self.in_flight)
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if services is not None:
                services.metrics.in_flight.set(self.in_flight)


class RequestContext:
    """Request id, rate-limit fields, metrics, access log; unknown exceptions become a problem 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get("x-request-id", "")
        rid = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        token = logs.request_id.set(rid)
        charged, charged_token = ratelimit.track()
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_context(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                extra = [(b"x-request-id", rid.encode()), *ratelimit.header_fields(charged)]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_context)
        except Exception:
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if response_started:
                raise  # half a response went out: nothing more can be said on this connection
            await _send_problem(send_with_context, problems.internal_error_body(scope["path"], rid))
        finally:
            elapsed = time.perf_counter() - started
            template = getattr(scope.get("route"), "path", None) or "unmatched"
            services = _services(scope)
            if services is not None:
                services.metrics.http_duration.labels(scope["method"], template, str(status)).observe(elapsed)
            principal = scope.get("state", {}).get("principal")
            log.info(
                "%s %s %s",
                scope["method"],
                template,
                status,
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                    "principal": principal.user_id if principal else None,
                },
            )
            ratelimit.untrack(charged_token)
            logs.request_id.reset(token)


def create_app(
    settings: Settings | None = None, *, services: Services | None = None, metrics: Metrics | None = None
) -> FastAPI:
    """``metrics``: a registry the caller also feeds (``sfumato up``'s Triton supervisor)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.services = services or Services.build(settings, metrics=metrics)
        svc: Services = app.state.services
        await svc.start()  # the job-event hub, before the workers that wait on it
        if settings.model_repository is not None:  # the model registry learns what is exported
            async with svc.sessions() as session:
                await registry.sync_repository(session=session, repository=settings.model_repository)
        stop = asyncio.Event()
        workers = None
        if settings.workers > 0:
            workers = asyncio.create_task(run_workers(svc, count=settings.workers, stop=stop))
        runners = None
        if settings.training_runners > 0:
            from sfumato.control_plane.training_runner import run_training_runners

            runners = asyncio.create_task(
                run_training_runners(svc, count=settings.training_runners, stop=stop)
            )
        key_usage = asyncio.create_task(
            svc.key_usage.run(sessions=svc.sessions, interval_s=settings.key_usage_flush_s)
        )
        refits = None
        if settings.recommend_refit_interval_s > 0:
            refits = asyncio.create_task(recommendations.run_refits(svc, stop=stop))
        try:
            yield
        finally:
            stop.set()
            if refits is not None:
                refits.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refits
            key_usage.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await key_usage
            try:
                await svc.key_usage.flush(sessions=svc.sessions)  # the last minute's uses
            except Exception:
                log.exception("writing API keys' last use at shutdown failed")
            if workers is not None:
                await workers
            if runners is not None:
                await runners
            if services is None:
                await svc.close()

    app = FastAPI(
        title="Sfumato control plane",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    if services is not None:
        app.state.services = services
    problems.install(app)
    app.include_router(generations.router)
    app.include_router(job_events.router)
    app.include_router(accounts.router)
    app.include_router(models.router)
    app.include_router(models.triton_router)
    app.include_router(operations.router)
    app.include_router(edge.router)
    app.include_router(gallery.router)
    app.include_router(webhook_routes.router)
    # The web playground: the page at `/`, its files under /playground (routers/playground.py).
    app.include_router(playground_page.router)
    app.mount(playground_page.PREFIX, playground_page.static_files(), name="playground")
    app.include_router(datasets.router)
    app.include_router(trainings.router)

    # add_middleware wraps: the last added runs first. Request context outermost, so that a 503
    # or a 413 still carries X-Request-ID and is counted in the metrics and the access log.
    app.add_middleware(
        BodySizeLimit, limit=settings.max_body_bytes, paths={"/v1/datasets": settings.max_dataset_bytes}
    )
    app.add_middleware(LoadShedder, limit=settings.max_requests_in_flight)
    app.add_middleware(RequestContext)
    return app
