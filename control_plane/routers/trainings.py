"""``/v1/trainings``: start a fine-tune, follow it, cancel it, download its LoRA weights.

Thin: every query and commit is in :mod:`sfumato.control_plane.trainings`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from sfumato.control_plane import jobs, trainings
from sfumato.control_plane.auth import CurrentPrincipal
from sfumato.control_plane.deps import ServicesDep, SessionDep
from sfumato.control_plane.problems import NOT_FOUND, PROBLEM_RESPONSES, problem_response
from sfumato.control_plane.schemas import JobStatus
from sfumato.control_plane.training_schemas import (
    TrainingCreate,
    TrainingOut,
    TrainingPage,
)
from sfumato.errors import NotFoundError

router = APIRouter(prefix="/v1/trainings", tags=["trainings"], responses=PROBLEM_RESPONSES)
TrainingId = Annotated[str, Path(min_length=1, max_length=64, description="the training's id")]


@router.post(
    "",
    status_code=202,
    response_model=TrainingOut,
    summary="Start a training (the trainer or admin role)",
    responses={
        202: {"description": "Queued; poll the `Location`", "model": TrainingOut},
        **problem_response(403, "Forbidden", "Not a trainer", "training needs the trainer or admin role"),
    },
)
async def create_training(
    body: TrainingCreate, principal: CurrentPrincipal, session: SessionDep, services: ServicesDep
) -> JSONResponse:
    await services.limiter.hit(
        services.settings.submit_rate_limit, scope="submit", principal=principal.user_id
    )
    job = await trainings.create_training(
        session=session, settings=services.settings, principal=principal, body=body
    )
    return JSONResponse(
        trainings.to_out(job).model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/v1/trainings/{job.id}"},
    )


@router.get("", response_model=TrainingPage, summary="List your trainings, newest first")
async def list_trainings(
    principal: CurrentPrincipal,
    session: SessionDep,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page")
    ] = None,
    status: Annotated[JobStatus | None, Query(description="only trainings in this status")] = None,
) -> TrainingPage:
    page = await trainings.list_trainings(
        session=session, principal=principal, limit=limit, cursor=cursor, status=status
    )
    return TrainingPage(items=[trainings.to_out(j) for j in page.items], next_cursor=page.next_cursor)


@router.get("/{training_id}", response_model=TrainingOut, summary="Read a training", responses=NOT_FOUND)
async def get_training(
    training_id: TrainingId, principal: CurrentPrincipal, session: SessionDep, services: ServicesDep
) -> TrainingOut:
    job = await trainings.read_training(session=session, principal=principal, training_id=training_id)
    return trainings.to_out(job)


@router.post(
    "/{training_id}/cancel",
    response_model=TrainingOut,
    summary="Cancel a training (a running one stops within seconds)",
    responses={
        **NOT_FOUND,
        **problem_response(409, "Conflict", "Already finished", "training 5f2c... is already succeeded"),
    },
)
async def cancel_training(
    training_id: TrainingId, principal: CurrentPrincipal, session: SessionDep, services: ServicesDep
) -> TrainingOut:
    job = await trainings.cancel_training(session=session, principal=principal, training_id=training_id)
    return trainings.to_out(job)


async def _stream(services, key: str, media_type: str, headers: dict[str, str] | None = None) -> Response:  # type: ignore[no-untyped-def]
    try:
        reader = await services.store.open(key)
    except FileNotFoundError:
        raise NotFoundError("the file is missing from the store") from None
    return StreamingResponse(
        reader.chunks(),
        media_type=media_type,
        headers={"Content-Length": str(reader.size), **(headers or {})},
    )


@router.get(
    "/{training_id}/weights",
    summary="Download the LoRA weights (diffusers format: pipe.load_lora_weights)",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "pytorch_lora_weights.safetensors"},
        **NOT_FOUND,
        **problem_response(
            409, "Conflict", "Not finished", "training 5f2c... is running; its weights come once it succeeded"
        ),
    },
)
async def get_weights(
    training_id: TrainingId, principal: CurrentPrincipal, session: SessionDep, services: ServicesDep
) -> Response:
    key = await trainings.weights_of(session=session, principal=principal, training_id=training_id)
    disposition = {"Content-Disposition": 'attachment; filename="pytorch_lora_weights.safetensors"'}
    return await _stream(services, key, "application/octet-stream", disposition)


@router.get(
    "/{training_id}/validation/{index}",
    summary="One validation image (PNG)",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "the PNG"}, **NOT_FOUND},
)
async def get_validation_image(
    training_id: TrainingId,
    index: Annotated[int, Path(ge=0, le=100)],
    principal: CurrentPrincipal,
    session: SessionDep,
    services: ServicesDep,
) -> Response:
    key = await trainings.validation_image_of(
        session=session, principal=principal, training_id=training_id, index=index
    )
    return await _stream(services, key, "image/png")


async def _stream_start(
    training_id: TrainingId,
    principal: CurrentPrincipal,
    session: SessionDep,
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", description="resume after this event (the `id:` last received)"),
    ] = None,
) -> jobs.EventStream:
    from sfumato.control_plane.routers.events import _last_event_id

    return await jobs.open_event_stream(
        session=session,
        principal=principal,
        job_id=training_id,
        last_event_id=_last_event_id(last_event_id),
        queue=trainings.QUEUE,
    )


@router.get(
    "/{training_id}/events",
    response_class=EventSourceResponse,
    summary="Follow a training: Server-Sent Events (status, progress, completed)",
    responses={
        200: {
            "description": "`text/event-stream`, the generations' events: `status` and `completed` (data: "
            "the training, as `GET /v1/trainings/{id}` returns it) and `progress` (data: "
            '`{"step", "total", "loss", "eta_s", "progress"}`); `id:` numbers them, `Last-Event-ID` '
            "resumes. The stream ends after `completed`."
        },
        **NOT_FOUND,
    },
)
async def training_events(
    start: Annotated[jobs.EventStream, Depends(_stream_start)], services: ServicesDep
) -> AsyncIterator[ServerSentEvent]:
    async for event in jobs.follow_events(hub=services.events, stream=start):
        yield ServerSentEvent(event=event.kind, id=str(event.seq), data=event.data)
