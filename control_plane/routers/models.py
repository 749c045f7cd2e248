"""``/v1/models``: Triton's model repository, for admins (explicit model control)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel

from sfumato.control_plane.auth import AdminPrincipal
from sfumato.control_plane.deps import ServicesDep
from sfumato.control_plane.problems import FORBIDDEN, NOT_FOUND, PROBLEM_RESPONSES, problem_response
from sfumato.errors import NotFoundError, ServiceUnavailableError, UsageError

router = APIRouter(prefix="/v1/models", tags=["models"], responses={**PROBLEM_RESPONSES, **FORBIDDEN})
ModelName = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")]
UNAVAILABLE = problem_response(
    503, "Service unavailable", "Triton is unreachable", "Triton at 127.0.0.1:8001 ..."
)


class ModelState(BaseModel):
    model_config = {
        "json_schema_extra": {
            "examples": [{"name": "pipeline", "version": "1", "state": "READY", "reason": ""}]
        }
    }
    name: str
    version: str
    state: str
    reason: str


async def _triton(services: Any):  # -> aio client
    import tritonclient.grpc.aio as aio

    return aio.InferenceServerClient(services.settings.triton_url)


def _admin_headers(services: Any) -> dict[str, str]:
    """Triton's restricted protocols (repository, config) demand the installation's key."""
    from sfumato.triton_server import ADMIN_KEY_GRPC_METADATA

    return {ADMIN_KEY_GRPC_METADATA: services.settings.triton_restricted_key()}


async def _index(services: Any) -> list[ModelState]:
    from tritonclient.utils import InferenceServerException

    client = await _triton(services)
    try:
        index = await client.get_model_repository_index(
            as_json=True, headers=_admin_headers(services), client_timeout=10
        )
    except InferenceServerException as exc:
        raise ServiceUnavailableError(f"Triton at {services.settings.triton_url}: {exc.message()}") from None
    finally:
        await client.close()
    return [
        ModelState(
            name=m["name"], version=m.get("version", ""), state=m.get("state", ""), reason=m.get("reason", "")
        )
        for m in index.get("models", [])
    ]


@router.get(
    "",
    response_model=list[ModelState],
    summary="List Triton's models and their state (admin)",
    responses=UNAVAILABLE,
)
async def list_models(_: AdminPrincipal, services: ServicesDep) -> list[ModelState]:
    return await _index(services)


async def _control(services: Any, name: str, action: str) -> list[ModelState]:
    from tritonclient.utils import InferenceServerException

    if name not in {m.name for m in await _index(services)}:
        raise NotFoundError(f"no model {name!r} in Triton's repository")
    client = await _triton(services)
    try:
        if action == "load":
            await client.load_model(name, headers=_admin_headers(services), client_timeout=300)
        else:
            await client.unload_model(name, headers=_admin_headers(services), client_timeout=300)
    except InferenceServerException as exc:
        raise UsageError(f"{action} {name}: {exc.message()}", field="name") from None
    finally:
        await client.close()
    # Triton unloads in the background once in-flight requests finish: report the settled state.
    for _ in range(300):
        state = [m for m in await _index(services) if m.name == name]
        if not state or state[0].state not in {"UNLOADING", "LOADING"}:
            break
        await asyncio.sleep(0.2)
    return state


@router.post(
    "/{name}/load",
    response_model=list[ModelState],
    summary="Load (or reload) a model (admin)",
    responses={**NOT_FOUND, **UNAVAILABLE},
)
async def load_model(name: ModelName, _: AdminPrincipal, services: ServicesDep) -> list[ModelState]:
    return await _control(services, name, "load")


@router.post(
    "/{name}/unload",
    response_model=list[ModelState],
    summary="Unload a model (admin)",
    responses={**NOT_FOUND, **UNAVAILABLE},
)
async def unload_model(name: ModelName, _: AdminPrincipal, services: ServicesDep) -> list[ModelState]:
    return await _control(services, name, "unload")
