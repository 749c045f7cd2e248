"""A generation's live events: ``GET /v1/generations/{id}/events`` (Server-Sent Events) and
``/v1/generations/{id}/ws`` (a WebSocket with the same messages as JSON).

Thin: the stream's start and its events come from :mod:`sfumato.control_plane.jobs`
(:func:`~sfumato.control_plane.jobs.open_event_stream`, ``follow_events``), which read through
the job-event channel (:mod:`sfumato.control_plane.events`). Both are job reads (the ``job_reads``
rate budget) and are never shed by the in-flight cap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, WebSocket
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.websockets import WebSocketDisconnect, WebSocketState

from sfumato.control_plane import auth, jobs
from sfumato.control_plane.auth import CurrentPrincipal, Principal
from sfumato.control_plane.deps import ServicesDep, SessionDep
from sfumato.control_plane.problems import NOT_FOUND, PROBLEM_RESPONSES
from sfumato.control_plane.routers.generations import JobId
from sfumato.errors import AuthenticationError, NotFoundError, RateLimitedError, UsageError

router = APIRouter(prefix="/v1/generations", tags=["generations"], responses=PROBLEM_RESPONSES)

#: WebSocket close codes (4000-4999 are the application's): like the HTTP statuses.
WS_UNAUTHENTICATED = 4401
WS_NOT_FOUND = 4404
WS_RATE_LIMITED = 4429
WS_BAD_REQUEST = 4400


def _last_event_id(value: str | None) -> int | None:
    if value is None or not value.strip():
        return None
    try:
        seq = int(value.strip())
    except ValueError:
        raise UsageError(
            "Last-Event-ID: must be an event id of this stream (an integer)", field="Last-Event-ID"
        ) from None
    if seq < 0:
        raise UsageError("Last-Event-ID: must not be negative", field="Last-Event-ID")
    return seq


async def _stream_start(
    job_id: JobId,
    principal: CurrentPrincipal,
    session: SessionDep,
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", description="resume after this event (the `id:` last received)"),
    ] = None,
) -> jobs.EventStream:
    # A dependency, so that a job that is not yours is a 404 before the stream starts.
    return await jobs.open_event_stream(
        session=session, principal=principal, job_id=job_id, last_event_id=_last_event_id(last_event_id)
    )


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    summary="Follow a generation: Server-Sent Events (status, progress, completed)",
    responses={
        200: {
            "description": "`text/event-stream`: events `status` and `completed` (data: the generation, "
            "as `GET /v1/generations/{id}` returns it) and `progress` (data: "
            '`{"step", "total", "progress", "preview"?}`); `id:` numbers them per job, and '
            "`Last-Event-ID` resumes after one. The stream ends after `completed`; a comment "
            "keeps it alive every 15 s."
        },
        **NOT_FOUND,
    },
)
async def generation_events(
    start: Annotated[jobs.EventStream, Depends(_stream_start)], services: ServicesDep
) -> AsyncIterator[ServerSentEvent]:
    async for event in jobs.follow_events(hub=services.events, stream=start):
        yield ServerSentEvent(event=event.kind, id=str(event.seq), data=event.data)


@router.websocket("/{job_id}/ws")
async def generation_ws(
    websocket: WebSocket, job_id: str, session: SessionDep, services: ServicesDep
) -> None:
    """The same events as JSON messages ``{"event", "id", "data"}``. Credential: ``?api_key=``,
    ``?access_token=``, or a first message ``{"authorization": "Bearer ..."}``; ``?last_event_id=``
    resumes. Closes with 1000 after ``completed``; 4401 (no or bad credential), 4404 (no such job
    of yours), 4429 (rate limited), 4400 (bad ``last_event_id``)."""
    await websocket.accept()
    try:
        token = await auth.websocket_credential(websocket)
        principal: Principal = await auth.authenticate_websocket(
            websocket, token=token, session=session, services=services
        )
        stream = await jobs.open_event_stream(
            session=session,
            principal=principal,
            job_id=job_id,
            last_event_id=_last_event_id(websocket.query_params.get("last_event_id")),
        )
    except AuthenticationError as exc:
        await websocket.close(WS_UNAUTHENTICATED, reason=str(exc)[:120])
        return
    except RateLimitedError as exc:
        await websocket.close(WS_RATE_LIMITED, reason=str(exc)[:120])
        return
    except NotFoundError as exc:
        await websocket.close(WS_NOT_FOUND, reason=str(exc)[:120])
        return
    except UsageError as exc:
        await websocket.close(WS_BAD_REQUEST, reason=str(exc)[:120])
        return

    async def pump() -> None:
        async for event in jobs.follow_events(hub=services.events, stream=stream):
            await websocket.send_json(event.message())

    sender = asyncio.create_task(pump())
    try:
        while True:  # read (and ignore) what the client sends, to notice it leaving
            receiver = asyncio.ensure_future(websocket.receive())
            done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if sender in done:
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                    await receiver
                sender.result()
                if websocket.application_state == WebSocketState.CONNECTED:
                    await websocket.close(1000)
                return
            if receiver.result().get("type") == "websocket.disconnect":
                return
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
            await sender
