"""``/v1/models``: the model registry (every user reads it; admins deploy, roll back and
delete versions), and Triton's own repository (admins: index, load, unload), both through the
Triton gateway (``services.triton``). Thin: the work is in :mod:`sfumato.control_plane.registry`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel

from sfumato.control_plane import registry, triton_gateway
from sfumato.control_plane.auth import AdminPrincipal, CurrentPrincipal
from sfumato.control_plane.deps import ReadSessionDep, ServicesDep, SessionDep
from sfumato.control_plane.models import RegisteredModel
from sfumato.control_plane.problems import FORBIDDEN, NOT_FOUND, PROBLEM_RESPONSES, problem_response
from sfumato.control_plane.schemas import ModelOut, ModelVersionOut
from sfumato.serving.contract import ModelContract

router = APIRouter(prefix="/v1/models", tags=["models"], responses=PROBLEM_RESPONSES)
triton_router = APIRouter(prefix="/v1/triton", tags=["models"], responses={**PROBLEM_RESPONSES, **FORBIDDEN})
ModelName = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")]
Version = Annotated[int, Path(ge=1, le=2**31 - 1, description="the model's version")]
UNAVAILABLE = problem_response(
    503, "Service unavailable", "Triton is unreachable", "Triton at 127.0.0.1:8001 ..."
)
CONFLICT = problem_response(
    409, "Conflict", "Not in a state that allows it", "version 2 of 'sfumato-shapes' is deployed; ..."
)


def version_out(version) -> ModelVersionOut:
    return ModelVersionOut(
        version=version.version,
        status=version.status,
        deployed=version.deployed,
        deployed_at=version.deployed_at,
        created_at=version.created_at,
        ready_at=version.ready_at,
        lineage=version.lineage or {},
        files=version.files or {},
        validation=version.validation or [],
        error=version.error,
    )


def model_out(model: RegisteredModel, served: ModelContract | None) -> ModelOut:
    described = served.as_dict() if served is not None else {}
    deployed = next((v.version for v in model.versions if v.deployed), None)
    return ModelOut(
        name=model.name,
        default=model.is_default,
        deployed_version=deployed,
        triton_model=model.triton_pipeline,
        limits=described.get("limits"),
        defaults=described.get("defaults"),
        versions=[version_out(v) for v in model.versions],
    )


@router.get("", response_model=list[ModelOut], summary="List the models, their versions, limits and defaults")
async def list_models(_: CurrentPrincipal, session: ReadSessionDep, services: ServicesDep) -> list[ModelOut]:
    models = await registry.list_models(session=session)
    served = await registry.contracts(triton=services.triton, models=models)
    return [model_out(m, served[m.name]) for m in models]


@router.get("/{name}", response_model=ModelOut, summary="Read a model", responses=NOT_FOUND)
async def read_model(
    name: ModelName, _: CurrentPrincipal, session: ReadSessionDep, services: ServicesDep
) -> ModelOut:
    model = await registry.read_model(session=session, model=name)
    return model_out(model, await registry.served_contract(triton=services.triton, model=model))


@router.get(
    "/{name}/versions/{version}",
    response_model=ModelVersionOut,
    summary="Read a model version (status, lineage, files, validation)",
    responses=NOT_FOUND,
)
async def read_version(name: ModelName, version: Version, _: CurrentPrincipal, session: ReadSessionDep):
    return version_out(await registry.read_version(session=session, model=name, version=version))


@router.post(
    "/{name}/versions/{version}/deploy",
    response_model=ModelVersionOut,
    summary="Make this version the one new generations get (admin)",
    responses={**FORBIDDEN, **NOT_FOUND, **CONFLICT, **UNAVAILABLE},
)
async def deploy_version(
    name: ModelName, version: Version, _: AdminPrincipal, session: SessionDep, services: ServicesDep
) -> ModelVersionOut:
    entry = await registry.deploy_version(
        session=session, triton=services.triton, model=name, version=version
    )
    return version_out(entry)


@router.post(
    "/{name}/rollback",
    response_model=ModelVersionOut,
    summary="Deploy the version deployed before the current one (admin)",
    responses={**FORBIDDEN, **NOT_FOUND, **CONFLICT, **UNAVAILABLE},
)
async def rollback(name: ModelName, _: AdminPrincipal, session: SessionDep, services: ServicesDep):
    return version_out(await registry.rollback(session=session, triton=services.triton, model=name))


@router.delete(
    "/{name}/versions/{version}",
    status_code=204,
    summary="Unload and delete an unused version (admin; not the deployed one)",
    responses={**FORBIDDEN, **NOT_FOUND, **CONFLICT, **UNAVAILABLE},
)
async def delete_version(
    name: ModelName, version: Version, _: AdminPrincipal, session: SessionDep, services: ServicesDep
) -> Response:
    await registry.delete_version(session=session, triton=services.triton, model=name, version=version)
    return Response(status_code=204)


# --------------------------------------------------------------------------- Triton's repository


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


def _out(states: list[triton_gateway.ModelState]) -> list[ModelState]:
    return [ModelState(name=m.name, version=m.version, state=m.state, reason=m.reason) for m in states]


@triton_router.get(
    "/models",
    response_model=list[ModelState],
    summary="List Triton's models, every version, and their state (admin)",
    responses=UNAVAILABLE,
)
async def triton_models(_: AdminPrincipal, services: ServicesDep) -> list[ModelState]:
    return _out(await services.triton.models())


@router.post(
    "/{name}/load",
    response_model=list[ModelState],
    summary="Load (or reload) a Triton model, every version on disk (admin)",
    responses={**FORBIDDEN, **NOT_FOUND, **UNAVAILABLE},
)
async def load_model(name: ModelName, _: AdminPrincipal, services: ServicesDep) -> list[ModelState]:
    return _out(await services.triton.load(name))


@router.post(
    "/{name}/unload",
    response_model=list[ModelState],
    summary="Unload a Triton model (admin)",
    responses={**FORBIDDEN, **NOT_FOUND, **UNAVAILABLE},
)
async def unload_model(name: ModelName, _: AdminPrincipal, services: ServicesDep) -> list[ModelState]:
    return _out(await services.triton.unload(name))
