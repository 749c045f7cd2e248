"""``/healthz``, ``/readyz`` and ``/metrics``."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from sfumato.control_plane.deps import ServicesDep
from sfumato.control_plane.metrics import observe_jobs

router = APIRouter(tags=["operations"])


@router.get(
    "/healthz",
    summary="Liveness: the process answers",
    responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}},
)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: database reachable and Triton ready",
    responses={
        200: {
            "description": "Ready",
            "content": {
                "application/json": {
                    "example": {"status": "ok", "checks": {"database": "ok", "triton": "ok"}}
                }
            },
        },
        503: {
            "description": "A dependency is not ready",
            "content": {
                "application/json": {
                    "example": {
                        "status": "unavailable",
                        "checks": {"database": "ok", "triton": "Triton is not ready"},
                    }
                }
            },
        },
    },
)
async def readyz(services: ServicesDep) -> Response:
    checks: dict[str, str] = {}
    try:
        async with services.read_sessions() as session:
            await asyncio.wait_for(session.execute(text("SELECT 1")), 3.0)
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    problem = await services.triton.readiness()  # the gateway's, cached for a second
    checks["triton"] = problem or "ok"
    ready = all(v == "ok" for v in checks.values())
    body = json.dumps({"status": "ok" if ready else "unavailable", "checks": checks})
    return Response(body, status_code=200 if ready else 503, media_type="application/json")


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "text exposition format"}},
)
async def metrics(services: ServicesDep) -> Response:
    async with services.read_sessions() as session:
        await observe_jobs(session=session, metrics=services.metrics)
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
