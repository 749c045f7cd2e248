"""``/v1/generations``: submit, read, list, cancel, retry, delete, and fetch images.

Thin: every query and commit is in :mod:`sfumato.control_plane.jobs`."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse

from sfumato.control_plane import jobs
from sfumato.control_plane.auth import CurrentPrincipal
from sfumato.control_plane.deps import ServicesDep, SessionDep
from sfumato.control_plane.models import FINAL_STATUSES
from sfumato.control_plane.problems import NOT_FOUND, PROBLEM_RESPONSES, problem_response
from sfumato.control_plane.schemas import GenerationCreate, GenerationOut, GenerationPage, JobStatus
from sfumato.errors import NotFoundError

router = APIRouter(prefix="/v1/generations", tags=["generations"], responses=PROBLEM_RESPONSES)
JobId = Annotated[str, Path(min_length=1, max_length=64, description="the generation's id")]
_WAIT = re.compile(r"(?:^|[,;\s])wait=(\d+)")


to_out = jobs.to_out  # the generation resource (also the data of its status events)


def _prefer_wait(prefer: str | None, limit: int) -> int:
    if not prefer:
        return 0
    match = _WAIT.search(prefer)
    if match is None:
        return 0
    return min(int(match.group(1)), limit)


@router.post(
    "",
    status_code=202,
    response_model=GenerationOut,
    summary="Submit a generation",
    responses={
        200: {
            "description": "Finished within `Prefer: wait=N`; with `Accept: image/png`, the first image",
            "model": GenerationOut,
            "content": {"image/png": {}},
        },
        202: {"description": "Accepted; poll the `Location`", "model": GenerationOut},
        **problem_response(
            413, "Payload too large", "Body or image too large", "image: larger than 4194304 bytes"
        ),
    },
)
async def create_generation(
    body: GenerationCreate,
    request: Request,
    principal: CurrentPrincipal,
    session: SessionDep,
    services: ServicesDep,
    prefer: Annotated[
        str | None, Header(description="`wait=N` (N <= 60): answer when done, up to N s")
    ] = None,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", description="retry-safe submission (IETF draft)")
    ] = None,
) -> JSONResponse:
    await services.limiter.hit(
        services.settings.submit_rate_limit, scope="submit", principal=principal.user_id
    )
    job, created = await jobs.create_job(
        session=session,
        settings=services.settings,
        store=services.store,
        principal=principal,
        body=body,
        idempotency_key=idempotency_key,
        triton=services.triton,
    )
    wait = _prefer_wait(prefer, services.settings.max_wait_s)
    if wait:
        job = await jobs.wait_for_job(
            session=session, hub=services.events, principal=principal, job=job, wait_s=wait
        )
    out = to_out(job)
    headers = {"Location": f"/v1/generations/{job.id}"}
    if wait:
        headers["Preference-Applied"] = f"wait={wait}"
    if not created:
        headers["Idempotent-Replayed"] = "true"
    status = 200 if job.status in FINAL_STATUSES and wait else 202
    if status == 200 and job.status == "succeeded" and _wants_png(request.headers.get("accept")):
        # `Accept: image/png` with `Prefer: wait`: the first image itself, for one-line clients.
        data = await services.store.get(job.images[0].storage_key)
        headers["ETag"] = f'"{job.images[0].sha256}"'
        return Response(data, media_type="image/png", headers=headers)
    return JSONResponse(out.model_dump(mode="json"), status_code=status, headers=headers)


def _wants_png(accept: str | None) -> bool:
    """True when the client prefers ``image/png`` over JSON (``Accept: image/png``)."""
    if not accept:
        return False
    types = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    return "image/png" in types and types.index("image/png") < (
        types.index("application/json") if "application/json" in types else len(types)
    )


def _none_match(if_none_match: str, etag: str) -> bool:
    """``If-None-Match`` matches ``etag``: ``*``, or any listed tag by weak comparison (RFC 9110
    §13.1.2: ``W/"x"`` matches ``"x"``)."""
    tags = [t.strip() for t in if_none_match.split(",")]
    return "*" in tags or etag in [t.removeprefix("W/") for t in tags]


@router.get("", response_model=GenerationPage, summary="List your generations, newest first")
async def list_generations(
    principal: CurrentPrincipal,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page")
    ] = None,
    status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
) -> GenerationPage:
    page = await jobs.list_jobs(
        session=session, principal=principal, limit=limit, cursor=cursor, status=status
    )
    return GenerationPage(items=[to_out(j) for j in page.items], next_cursor=page.next_cursor)


@router.get("/{job_id}", response_model=GenerationOut, summary="Read a generation", responses=NOT_FOUND)
async def get_generation(job_id: JobId, principal: CurrentPrincipal, session: SessionDep) -> GenerationOut:
    return to_out(await jobs.read_job(session=session, principal=principal, job_id=job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=GenerationOut,
    summary="Cancel a generation",
    responses={
        **NOT_FOUND,
        **problem_response(409, "Conflict", "Already finished", "generation 5f2c... is already succeeded"),
    },
)
async def cancel_generation(
    job_id: JobId, principal: CurrentPrincipal, session: SessionDep, services: ServicesDep
) -> GenerationOut:
    job = await jobs.cancel_job(session=session, principal=principal, job_id=job_id)
    # Canceled at once: it was queued; still running: its worker was asked to stop it.
    state = {"canceled": "queued", "running": "running"}.get(job.status)
    if state is not None:
        services.metrics.jobs_canceled.labels(state=state).inc()
    if job.status == "canceled" and job.finished_at is not None:  # it was queued: final now
        services.metrics.job_duration.labels(model=job.model_name, status="canceled").observe(
            (job.finished_at - job.created_at).total_seconds()
        )
    return to_out(job)


@router.post(
    "/{job_id}/retry",
    response_model=GenerationOut,
    status_code=202,
    summary="Retry a failed or canceled generation",
    responses={
        202: {"description": "Queued again, with the same parameters and seed", "model": GenerationOut},
        **NOT_FOUND,
        **problem_response(
            409,
            "Conflict",
            "Not failed or canceled",
            "generation 5f2c... is succeeded; only a failed or canceled one can be retried",
        ),
    },
)
async def retry_generation(
    job_id: JobId, principal: CurrentPrincipal, session: SessionDep, services: ServicesDep
) -> JSONResponse:
    """Queue the job again as new (attempts, error and timings reset), keeping its parameters and
    seed, so that its images are the ones a first run would have drawn. Counts against your
    unfinished-jobs cap and your submission rate."""
    await services.limiter.hit(
        services.settings.submit_rate_limit, scope="submit", principal=principal.user_id
    )
    job = await jobs.retry_job(
        session=session, settings=services.settings, principal=principal, job_id=job_id
    )
    return JSONResponse(
        to_out(job).model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/v1/generations/{job.id}"},
    )


@router.delete(
    "/{job_id}", status_code=204, summary="Delete a generation and its images", responses=NOT_FOUND
)
async def delete_generation(
    job_id: JobId, principal: CurrentPrincipal, session: SessionDep, services: ServicesDep
) -> Response:
    await jobs.delete_job(session=session, store=services.store, principal=principal, job_id=job_id)
    return Response(status_code=204)


@router.get(
    "/{job_id}/images/{index}",
    summary="Download one image (PNG with the parameters in text chunks)",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "the PNG"},
        **NOT_FOUND,
        304: {"description": "Not modified (If-None-Match)"},
        307: {
            "description": "with SFUMATO_STORAGE_DOWNLOADS=redirect: a presigned URL of the object "
            "store (valid for SFUMATO_STORAGE_PRESIGN_S seconds) in `Location`"
        },
    },
)
async def get_image(
    job_id: JobId,
    index: Annotated[int, Path(ge=0, le=1000)],
    principal: CurrentPrincipal,
    session: SessionDep,
    services: ServicesDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    image = await jobs.read_image(session=session, principal=principal, job_id=job_id, index=index)
    etag = f'"{image.sha256}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"}
    if if_none_match and _none_match(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    store, settings = services.store, services.settings
    if settings.storage_downloads == "redirect":
        # The owner check above is the API's; the URL then lets this client alone GET the object
        # for a few minutes, straight from the store (and must not be cached past that).
        url = await store.presigned_url(image.storage_key, expires_s=settings.storage_presign_s)
        if url is not None:
            return RedirectResponse(
                url, status_code=307, headers={"ETag": etag, "Cache-Control": "private, no-store"}
            )
    try:
        reader = await store.open(image.storage_key)
    except FileNotFoundError:
        raise NotFoundError(f"image {index} of generation {job_id} is missing from the store") from None
    headers["Content-Length"] = str(reader.size)
    return StreamingResponse(reader.chunks(), media_type="image/png", headers=headers)
