"""A local HTTPS server that answers the Kubernetes API calls the training executor makes (the
one mock of the suite: no Kubernetes API server can run here). It keeps Jobs in memory, checks
the bearer token like an API server, speaks the API's Status objects and records every call, so
that tests can act as the Job controller and Kueue (flip ``suspend``, set ``active`` and
conditions) and see exactly what the executor sent.

Served by uvicorn over TLS with a throw-away CA made by ``cryptography``.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from sfumato.triton_server import free_port

from . import tls


def make_ca_and_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca.crt, tls.crt, tls.key)."""
    return tls.make_ca_and_cert(
        directory, host="127.0.0.1", common_name="kubernetes", ca_name="test kubernetes CA"
    )


def _status(code: int, reason: str, message: str) -> JSONResponse:
    return JSONResponse(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        },
        status_code=code,
    )


@dataclass
class FakeKubernetes:
    """The API's state: Jobs by (namespace, name), pods' logs, the token it accepts, the calls."""

    token: str
    jobs: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)  # Job name -> its pod's log
    calls: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def authenticate(request: Request, call_next):  # type: ignore[no-untyped-def]
            body = await request.body()
            self.calls.append(
                {
                    "method": request.method,
                    "path": request.url.path,
                    "query": dict(request.query_params),
                    "json": __import__("json").loads(body) if body else None,
                }
            )
            if request.headers.get("authorization") != f"Bearer {self.token}":
                return _status(401, "Unauthorized", "Unauthorized")
            return await call_next(request)

        @app.post("/apis/batch/v1/namespaces/{namespace}/jobs")
        async def create(namespace: str, request: Request) -> JSONResponse:
            job = await request.json()
            name = job["metadata"]["name"]
            if job["metadata"].get("namespace", namespace) != namespace:
                return _status(400, "BadRequest", "the namespace of the provided object does not match")
            if (namespace, name) in self.jobs:
                return _status(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
            job["metadata"].update(uid=f"uid-{len(self.jobs)}", creationTimestamp="2026-01-01T00:00:00Z")
            job["status"] = {}
            self.jobs[(namespace, name)] = job
            return JSONResponse(job, status_code=201)

        @app.get("/apis/batch/v1/namespaces/{namespace}/jobs/{name}")
        async def read(namespace: str, name: str) -> JSONResponse:
            job = self.jobs.get((namespace, name))
            if job is None:
                return _status(404, "NotFound", f'jobs.batch "{name}" not found')
            return JSONResponse(job)

        @app.delete("/apis/batch/v1/namespaces/{namespace}/jobs/{name}")
        async def delete(namespace: str, name: str) -> JSONResponse:
            job = self.jobs.pop((namespace, name), None)
            if job is None:
                return _status(404, "NotFound", f'jobs.batch "{name}" not found')
            return JSONResponse({"kind": "Status", "apiVersion": "v1", "status": "Success"})

        @app.get("/api/v1/namespaces/{namespace}/pods")
        async def pods(namespace: str, labelSelector: str = "") -> JSONResponse:
            name = labelSelector.removeprefix("job-name=")
            items = [
                {"metadata": {"name": f"{name}-{i}", "creationTimestamp": f"2026-01-01T00:0{i}:00Z"}}
                for i in range(2)
                if (namespace, name) in self.jobs
            ]
            return JSONResponse({"kind": "PodList", "apiVersion": "v1", "items": items})

        @app.get("/api/v1/namespaces/{namespace}/pods/{pod}/log")
        async def log(namespace: str, pod: str, tailLines: int = 0) -> PlainTextResponse:
            job = pod.rsplit("-", 1)[0]
            lines = self.logs.get(job, "").splitlines()
            return PlainTextResponse("\n".join(lines[-tailLines:] if tailLines else lines) + "\n")

        return app

    def job(self, namespace: str, name: str) -> dict[str, Any]:
        return self.jobs[(namespace, name)]


@contextlib.asynccontextmanager
async def serve(state: FakeKubernetes, tls_dir: Path):  # -> AsyncIterator[tuple[str, Path]]
    """Serve ``state`` over HTTPS on a free port; yields (the API URL, the CA file)."""
    ca, cert, key = make_ca_and_cert(tls_dir)
    port = free_port()
    config = uvicorn.Config(
        state.app(),
        host="127.0.0.1",
        port=port,
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
        log_level="warning",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        yield f"https://127.0.0.1:{port}", ca
    finally:
        server.should_exit = True
        await task
