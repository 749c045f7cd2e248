"""``/v1/datasets``: upload a training data set (a zip), list, read and delete yours.

Thin: every check, query and commit is in :mod:`sfumato.control_plane.datasets`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Path, Query, Response, UploadFile
from fastapi.responses import JSONResponse

from sfumato.control_plane import datasets
from sfumato.control_plane.auth import CurrentPrincipal
from sfumato.control_plane.deps import ServicesDep, SessionDep
from sfumato.control_plane.models import Dataset
from sfumato.control_plane.problems import NOT_FOUND, PROBLEM_RESPONSES, problem_response
from sfumato.control_plane.training_schemas import DatasetOut, DatasetPage

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=PROBLEM_RESPONSES)
DatasetId = Annotated[str, Path(min_length=1, max_length=64, description="the data set's id")]


def to_out(dataset: Dataset) -> DatasetOut:
    return DatasetOut(
        id=dataset.id,
        name=dataset.name,
        num_images=dataset.num_images,
        size_bytes=dataset.size_bytes,
        sha256=dataset.sha256,
        created_at=dataset.created_at,
    )


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    summary="Upload a data set: a zip of images and metadata.jsonl",
    responses={
        201: {"description": "Checked and stored", "model": DatasetOut},
        **problem_response(
            413, "Payload too large", "Upload too large", "request body larger than 268435456 bytes"
        ),
    },
)
async def create_dataset(
    principal: CurrentPrincipal,
    session: SessionDep,
    services: ServicesDep,
    file: Annotated[
        UploadFile,
        File(
            description="a .zip holding images (PNG, JPEG, WebP) and a metadata.jsonl whose lines are "
            '{"file_name": "...", "text": "..."} (the Hugging Face image-folder convention)'
        ),
    ],
) -> JSONResponse:
    await services.limiter.hit(
        services.settings.submit_rate_limit, scope="submit", principal=principal.user_id
    )
    dataset = await datasets.create_dataset(
        session=session,
        settings=services.settings,
        store=services.store,
        principal=principal,
        source=file.file,
        name=file.filename or "",
    )
    return JSONResponse(
        to_out(dataset).model_dump(mode="json"),
        status_code=201,
        headers={"Location": f"/v1/datasets/{dataset.id}"},
    )


@router.get("", response_model=DatasetPage, summary="List your data sets, newest first")
async def list_datasets(
    principal: CurrentPrincipal,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page")
    ] = None,
) -> DatasetPage:
    page = await datasets.list_datasets(session=session, principal=principal, limit=limit, cursor=cursor)
    return DatasetPage(items=[to_out(d) for d in page.items], next_cursor=page.next_cursor)


@router.get("/{dataset_id}", response_model=DatasetOut, summary="Read a data set", responses=NOT_FOUND)
async def get_dataset(dataset_id: DatasetId, principal: CurrentPrincipal, session: SessionDep) -> DatasetOut:
    return to_out(await datasets.get_dataset(session=session, principal=principal, dataset_id=dataset_id))


@router.delete(
    "/{dataset_id}",
    status_code=204,
    summary="Delete a data set and its files",
    responses={
        **NOT_FOUND,
        **problem_response(409, "Conflict", "In use", "dataset 9b1c... is used by a training"),
    },
)
async def delete_dataset(
    dataset_id: DatasetId, principal: CurrentPrincipal, session: SessionDep, services: ServicesDep
) -> Response:
    await datasets.delete_dataset(
        session=session, store=services.store, principal=principal, dataset_id=dataset_id
    )
    return Response(status_code=204)
