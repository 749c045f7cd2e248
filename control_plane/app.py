"""The FastAPI application factory.

``create_app(settings)`` wires settings, services (engine, image store, rate limiter,
metrics), the routers, problem-details errors, the request-id / metrics / access-log
middleware and the body size cap; its lifespan starts ``settings.workers`` in-process workers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sfumato import __version__
from sfumato.control_plane import logs, problems
from sfumato.control_plane.metrics import Metrics
from sfumato.control_plane.routers import accounts, edge, generations, models, operations
from sfumato.control_plane.services import Services
from sfumato.control_plane.settings import Settings, get_settings
from sfumato.control_plane.worker import run_workers

log = logging.getLogger("sfumato.api")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

DESCRIPTION = """
Sfumato's control plane: submit text-to-image generations as durable jobs, follow them, and
download the images. Authenticate with `Authorization: Bearer <API key or access token>`.
Errors are RFC 9457 `application/problem+json`.
"""


class BodySizeLimit:
    """Reject request bodies over ``limit`` bytes with 413, whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(send)
            return
        seen = 0
        too_large = False
        responder: str | None = None  # who answers: "app", or "limit" (our 413)

        async def limited_receive() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
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
                    await self._reject(send)
            if responder == "app":
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            if responder is None:
                responder = "limit"
                await self._reject(send)
            elif responder == "app":  # the app had already started its own response
                raise

    async def _reject(self, send: Send) -> None:
        body = json.dumps(
            {
                "type": "about:blank",
                "title": "Payload too large",
                "status": 413,
                "detail": f"request body larger than {self.limit} bytes",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", problems.PROBLEM_JSON.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(
    settings: Settings | None = None, *, services: Services | None = None, metrics: Metrics | None = None
) -> FastAPI:
    """``metrics``: a registry the caller also feeds (``sfumato up``'s Triton supervisor)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.services = services or Services.build(settings, metrics=metrics)
        stop = asyncio.Event()
        workers = None
        if settings.workers > 0:
            workers = asyncio.create_task(run_workers(app.state.services, count=settings.workers, stop=stop))
        try:
            yield
        finally:
            stop.set()
            if workers is not None:
                await workers
            if services is None:
                await app.state.services.close()

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
    app.include_router(accounts.router)
    app.include_router(models.router)
    app.include_router(operations.router)
    app.include_router(edge.router)

    # Added before the request-context middleware, so it runs inside it: a 413 still carries
    # X-Request-ID and is counted in the metrics and the access log.
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)

    @app.middleware("http")
    async def request_context(request: Request, call_next) -> Response:  # type: ignore[no-untyped-def]
        incoming = request.headers.get("x-request-id", "")
        rid = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        token = logs.request_id.set(rid)
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            response.headers["X-Request-ID"] = rid
            return response
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.url.path)
            raise
        finally:
            elapsed = time.perf_counter() - started
            route = request.scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            svc = getattr(request.app.state, "services", None)
            if svc is not None:
                svc.metrics.http_duration.labels(request.method, template, str(status)).observe(elapsed)
            principal = getattr(request.state, "principal", None)
            log.info(
                "%s %s %s",
                request.method,
                template,
                status,
                extra={
                    "method": request.method,
                    "path": request.url.path,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                    "principal": principal.user_id if principal else None,
                },
            )
            logs.request_id.reset(token)

    return app
