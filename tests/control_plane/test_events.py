"""The job-event channel, on SQLite and PostgreSQL: Server-Sent Events and the WebSocket over a
real uvicorn server (status, progress, completed; ``Last-Event-ID`` resumes; another user's job
is 404 / close code 4404), ``Prefer: wait`` woken by the ``completed`` event instead of polling,
and delivery between two app instances on one database (PostgreSQL LISTEN/NOTIFY, the SQLite
poller, Redis pub/sub).

Jobs are moved the way a worker moves them (the lease functions as worker ``test-worker``), so
these tests need no Triton; the worker's own events are in ``test_workers.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
import redis
import uvicorn
import websockets

from sfumato.clients.png import encode_png
from sfumato.control_plane import jobs, leases
from sfumato.triton_server import free_port

BODY = {"prompt": "a red circle on a white background", "steps": 10}
WORKER = "test-worker"
REDIS = "redis://127.0.0.1:6379/0"


# --------------------------------------------------------------------------- helpers


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[Any]:
    """``await serve(api)``: the app (lifespan already running) on a real uvicorn server; its URL."""
    servers: list[tuple[uvicorn.Server, asyncio.Task]] = []

    async def start(api: Any) -> str:
        port = free_port()
        config = uvicorn.Config(
            api.app,
            host="127.0.0.1",
            port=port,
            lifespan="off",
            log_level="warning",
            ws="websockets-sansio",
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        servers.append((server, task))
        async with asyncio.timeout(60):
            while not server.started:
                assert not task.done(), task
                await asyncio.sleep(0.02)
        return f"127.0.0.1:{port}"

    yield start
    for server, _task in servers:
        server.should_exit = True
    for _, task in servers:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)


async def sse(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
    """The events of an SSE stream, each ``{"event", "id", "data"}`` (data parsed), until it ends."""
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        event: dict[str, Any] = {}
        async for line in response.aiter_lines():
            if not line:
                if "event" in event:
                    yield event
                event = {}
            elif line.startswith(":"):
                continue  # keep-alive comment
            else:
                name, _, value = line.partition(": ")
                event[name] = json.loads(value) if name == "data" else value


async def claim(api: Any, job_id: str) -> None:
    async with api.app.state.services.sessions() as session:
        claimed = await leases.claim(session=session, worker_id=WORKER, lease_s=60)
    assert [job.id for job in claimed] == [job_id]


async def progress(api: Any, job_id: str, step: int, total: int, preview: str | None = None) -> None:
    async with api.app.state.services.sessions() as session:
        assert await leases.progress(
            session=session, job_id=job_id, worker_id=WORKER, step=step, total=total, preview=preview
        )


async def complete(api: Any, job_id: str) -> None:
    services = api.app.state.services
    png = encode_png(np.full((32, 32, 3), (200, 30, 30), dtype=np.uint8))
    key = f"generations/{job_id}/0.png"
    await services.store.put(key, png)
    row = {
        "index": 0,
        "storage_key": key,
        "seed": 7,
        "width": 32,
        "height": 32,
        "sha256": hashlib.sha256(png).hexdigest(),
    }
    async with services.sessions() as session:
        assert await leases.complete(
            session=session, job_id=job_id, worker_id=WORKER, images=[row], inference_s=0.1
        )


async def read(api: Any, who: dict[str, str], job_id: str) -> dict[str, Any]:
    r = await api.client.get(f"/v1/generations/{job_id}", headers=api.headers(who))
    assert r.status_code == 200, r.text
    return r.json()


async def next_event(stream: AsyncIterator[dict[str, Any]], timeout: float = 60) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        return await anext(stream)


# --------------------------------------------------------------------------- SSE


async def test_sse_streams_status_progress_completed_and_resumes(api_factory, serve) -> None:
    api = await api_factory(event_resync_s=600)  # delivery by the channel, not by re-reading
    address = await serve(api)
    alice = await api.user("alice")
    job = (await api.client.post("/v1/generations", json=BODY, headers=api.headers(alice))).json()
    url = f"/v1/generations/{job['id']}/events"
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=60) as client:
        stream = sse(client, url, api.headers(alice))
        first = await next_event(stream)
        assert (first["event"], first["id"], first["data"]["status"]) == ("status", "1", "queued")
        assert (
            first["data"]
            == (await api.client.get(f"/v1/generations/{job['id']}", headers=api.headers(alice))).json()
        )

        await claim(api, job["id"])
        running = await next_event(stream)
        assert (running["event"], running["id"], running["data"]["status"]) == ("status", "2", "running")
        await progress(api, job["id"], 5, 10, preview="data:image/png;base64,AAAA")
        step = await next_event(stream)
        assert step == {
            "event": "progress",
            "id": "3",
            "data": {"step": 5, "total": 10, "progress": 0.5, "preview": "data:image/png;base64,AAAA"},
        }
        await complete(api, job["id"])
        done = await next_event(stream)
        assert (done["event"], done["id"], done["data"]["status"]) == ("completed", "4", "succeeded")
        assert (
            done["data"]
            == (await api.client.get(f"/v1/generations/{job['id']}", headers=api.headers(alice))).json()
        )
        with pytest.raises(StopAsyncIteration):  # the stream ends after `completed`
            await next_event(stream)

        # Resumed after event 1: what came since (progress events are dropped once it finished).
        resumed = [e async for e in sse(client, url, api.headers(alice, **{"Last-Event-ID": "1"}))]
        assert [(e["event"], e["id"]) for e in resumed] == [("status", "2"), ("completed", "4")]
        # A new stream of a finished job: its state, then the end.
        again = [e async for e in sse(client, url, api.headers(alice))]
        assert [(e["event"], e["id"]) for e in again] == [("completed", "4")]

        r = await client.get(url, headers=api.headers(alice, **{"Last-Event-ID": "x"}))
        assert r.status_code == 422 and "Last-Event-ID" in r.json()["detail"]


async def test_sse_resume_while_running_replays_what_was_missed(api_factory, serve) -> None:
    api = await api_factory(event_resync_s=600)
    address = await serve(api)
    alice = await api.user("alice")
    job = (await api.client.post("/v1/generations", json=BODY, headers=api.headers(alice))).json()
    await claim(api, job["id"])
    await progress(api, job["id"], 1, 10)
    await progress(api, job["id"], 2, 10)
    url = f"/v1/generations/{job['id']}/events"
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=60) as client:
        stream = sse(client, url, api.headers(alice, **{"Last-Event-ID": "2"}))
        assert [(await next_event(stream))["id"] for _ in range(2)] == ["3", "4"]
        await progress(api, job["id"], 3, 10)
        assert (await next_event(stream))["data"]["step"] == 3
        await complete(api, job["id"])
        assert (await next_event(stream))["event"] == "completed"


async def test_events_of_another_users_job_are_not_found(api_factory, serve) -> None:
    api = await api_factory()
    address = await serve(api)
    alice, mallory = await api.user("alice"), await api.user("mallory")
    job = (await api.client.post("/v1/generations", json=BODY, headers=api.headers(alice))).json()
    for job_id in (job["id"], "no-such-job"):
        r = await api.client.get(f"/v1/generations/{job_id}/events", headers=api.headers(mallory))
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json", r.text
        uri = f"ws://{address}/v1/generations/{job_id}/ws?api_key={mallory['key']}"
        async with websockets.connect(uri) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 60)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404
    r = await api.client.get(f"/v1/generations/{job['id']}/events")
    assert r.status_code == 401
    async with websockets.connect(f"ws://{address}/v1/generations/{job['id']}/ws?api_key=sfm_bogus") as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 60)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


# --------------------------------------------------------------------------- WebSocket


@pytest.mark.parametrize("how", ["query", "first_message"])
async def test_websocket_sends_the_same_messages(api_factory, serve, how: str) -> None:
    api = await api_factory(event_resync_s=600)
    address = await serve(api)
    alice = await api.user("alice")
    job = (await api.client.post("/v1/generations", json=BODY, headers=api.headers(alice))).json()
    uri = f"ws://{address}/v1/generations/{job['id']}/ws"
    if how == "query":
        uri += f"?api_key={alice['key']}"
    async with websockets.connect(uri) as ws:
        if how == "first_message":
            await ws.send(json.dumps({"authorization": alice["auth"]}))

        async def receive() -> dict[str, Any]:
            return json.loads(await asyncio.wait_for(ws.recv(), 60))

        first = await receive()
        assert (first["event"], first["id"], first["data"]["status"]) == ("status", 1, "queued")
        await claim(api, job["id"])
        assert (await receive())["data"]["status"] == "running"
        await progress(api, job["id"], 4, 10)
        assert await receive() == {
            "event": "progress",
            "id": 3,
            "data": {"step": 4, "total": 10, "progress": 0.4},
        }
        await complete(api, job["id"])
        done = await receive()
        assert (done["event"], done["id"], done["data"]["status"]) == ("completed", 4, "succeeded")
        with pytest.raises(websockets.ConnectionClosedOK):
            await asyncio.wait_for(ws.recv(), 60)


# --------------------------------------------------------------------------- Prefer: wait


async def test_prefer_wait_is_woken_by_the_completed_event(api_factory, monkeypatch) -> None:
    api = await api_factory(event_resync_s=600)
    alice = await api.user("alice")
    reads = 0
    read_job = jobs.read_job

    async def counted(**kwargs: Any):  # a spy on the real function, to count the job's reads
        nonlocal reads
        reads += 1
        return await read_job(**kwargs)

    monkeypatch.setattr(jobs, "read_job", counted)
    waiting = asyncio.create_task(
        api.client.post("/v1/generations", json=BODY, headers=api.headers(alice, Prefer="wait=60"))
    )
    async with asyncio.timeout(60):
        while not api.app.state.services.events._subscribers:  # the request listens
            await asyncio.sleep(0.01)
    job_id = next(iter(api.app.state.services.events._subscribers))
    await claim(api, job_id)
    await progress(api, job_id, 1, 10)
    await asyncio.sleep(0.3)  # (a polling loop would read the job several times meanwhile)
    await complete(api, job_id)
    r = await waiting
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    assert reads <= 2, reads  # once after listening, once when `completed` came: no polling


# --------------------------------------------------------------------------- across processes


@pytest.mark.parametrize("transport", ["database", "redis"])
async def test_events_reach_another_app_instance(api_factory, transport: str, database_url: str) -> None:
    """Two app instances on one database, each with its own engine and hub (as two processes
    have): events committed by one reach ``Prefer: wait`` and subscribers of the other through
    PostgreSQL LISTEN/NOTIFY or the SQLite poller, or through Redis when configured. (Resyncs
    are 10 minutes apart: only the transport can deliver within the test's deadlines.)"""
    extra: dict[str, Any] = {"event_resync_s": 600}
    if transport == "redis":
        redis.Redis.from_url(REDIS).ping()  # the project's Redis
        extra["redis_url"] = REDIS
    first = await api_factory(**extra)
    second = await api_factory(**extra)
    hub = first.app.state.services.events
    # Redis when configured; else PostgreSQL LISTEN/NOTIFY, or the SQLite poller.
    database = "postgresql" if "postgresql" in database_url else "sqlite-poll"
    assert hub.transport == ("redis" if transport == "redis" else database)
    alice = await first.user("alice")
    waiting = asyncio.create_task(
        first.client.post("/v1/generations", json=BODY, headers=first.headers(alice, Prefer="wait=60"))
    )
    async with asyncio.timeout(60):
        while not hub._subscribers:
            await asyncio.sleep(0.01)
    job_id = next(iter(hub._subscribers))
    seen: list[str] = []

    async def follow() -> None:
        async for event in hub.subscribe(job_id, after_seq=1):
            seen.append(event.kind)
            if event.kind == "completed":
                return

    follower = asyncio.create_task(follow())
    queued_before = hub.queued_count
    await claim(second, job_id)  # the other instance moves the job
    await progress(second, job_id, 3, 10)
    async with asyncio.timeout(60):  # (progress events are dropped once a job finishes)
        while "progress" not in seen:
            await asyncio.sleep(0.01)
    await complete(second, job_id)
    r = await waiting
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    await asyncio.wait_for(follower, 60)
    assert seen == ["status", "progress", "completed"]
    # A job queued through the other instance wakes this one's idle workers.
    woke = asyncio.create_task(hub.wait_for_queued(60, since=queued_before))
    r = await second.client.post("/v1/generations", json=BODY, headers=second.headers(alice))
    assert r.status_code == 202
    assert await asyncio.wait_for(woke, 60)


async def test_events_are_purged_with_long_finished_jobs(api_factory) -> None:
    from sfumato.control_plane import events

    api = await api_factory()
    alice = await api.user("alice")
    job = (await api.client.post("/v1/generations", json=BODY, headers=api.headers(alice))).json()
    await claim(api, job["id"])
    await progress(api, job["id"], 1, 10)
    services = api.app.state.services
    async with services.read_sessions() as session:
        assert [e.kind for e in await events.history(session=session, job_id=job["id"])] == [
            "status",
            "status",
            "progress",
        ]
    await complete(api, job["id"])
    async with services.sessions() as session:
        assert await events.purge(session=session, older_than_s=3600) == 0  # finished just now
        assert [e.kind for e in await events.history(session=session, job_id=job["id"])] == [
            "status",
            "status",
            "completed",
        ]
        assert await events.purge(session=session, older_than_s=0) == 3
        assert await events.history(session=session, job_id=job["id"]) == []
    # The stream of a finished job whose events were purged still says how it ended.
    stream = await api.client.get(f"/v1/generations/{job['id']}/events", headers=api.headers(alice))
    assert stream.status_code == 200 and "event: completed" in stream.text


# --------------------------------------------------------------------------- the worker's stream


async def collect(hub: Any, job_id: str, *, until_kind: str = "completed") -> list[Any]:
    seen = []
    async with asyncio.timeout(300):
        async for event in hub.subscribe(job_id, after_seq=0):
            seen.append(event)
            if event.kind == until_kind:
                return seen
    return seen


async def test_the_worker_streams_progress_and_previews(api_factory, triton) -> None:
    api = await api_factory(workers=1, triton_url=triton.grpc_url, progress_write_interval_s=0)
    alice = await api.user("alice")
    body = {"prompt": BODY["prompt"], "steps": 150, "num_images": 2, "preview_every": 10, "seed": 5}
    r = await api.client.post("/v1/generations", json=body, headers=api.headers(alice))
    assert r.status_code == 202, r.text
    assert r.json()["params"]["preview_every"] == 10
    seen = await collect(api.app.state.services.events, r.json()["id"])
    kinds = [e.kind for e in seen]
    assert kinds[:2] == ["status", "status"] and kinds[-1] == "completed", kinds
    assert seen[-1].data["status"] == "succeeded", seen[-1].data
    steps = [e.data for e in seen if e.kind == "progress"]
    assert steps, kinds
    assert [s["step"] for s in steps] == sorted({s["step"] for s in steps})  # in order, each once
    assert all(s["total"] == 150 and s["progress"] == round(s["step"] / 150, 4) for s in steps)
    previews = [s["preview"] for s in steps if "preview" in s]
    assert previews, steps
    import base64
    import io

    from PIL import Image as PILImage

    prefix = "data:image/png;base64,"
    assert previews[0].startswith(prefix)
    with PILImage.open(io.BytesIO(base64.b64decode(previews[0][len(prefix) :]))) as png:
        assert png.size == (2 * 32, 32)  # the two images side by side
    # A job that asks for no previews gets progress without them.
    r = await api.client.post(
        "/v1/generations", json={**body, "preview_every": None}, headers=api.headers(alice, Prefer="wait=120")
    )
    assert r.json()["status"] == "succeeded" and "preview_every" not in r.json()["params"]


async def test_cancel_of_a_streaming_job_ends_its_stream_and_the_worker_goes_on(api_factory, triton) -> None:
    api = await api_factory(
        workers=1, triton_url=triton.grpc_url, heartbeat_s=0.2, progress_write_interval_s=0
    )
    alice = await api.user("alice")
    hub = api.app.state.services.events
    long = {"prompt": BODY["prompt"], "steps": 150, "num_images": 4}
    job_id = (await api.client.post("/v1/generations", json=long, headers=api.headers(alice))).json()["id"]
    await collect(hub, job_id, until_kind="progress")  # its stream is running
    r = await api.client.post(f"/v1/generations/{job_id}/cancel", headers=api.headers(alice))
    assert r.status_code == 200, r.text
    seen = await collect(hub, job_id)
    assert seen[-1].data["status"] == "canceled" and seen[-1].data["error"] == "canceled while running"
    async with asyncio.timeout(120):  # its slot is free again
        while api.app.state.services.metrics.jobs_in_flight._value.get() != 0:
            await asyncio.sleep(0.02)
    r = await api.client.post(
        "/v1/generations", json={**BODY, "steps": 5}, headers=api.headers(alice, Prefer="wait=120")
    )
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text


async def test_an_idle_worker_of_another_instance_wakes_on_the_queued_event(api_factory, triton) -> None:
    """The worker polls only every 10 minutes here: a job submitted through another app
    instance (its own hub) is claimed because the "queued" event reaches the worker's process,
    and the waiting request is answered because the "completed" event comes back."""
    front = await api_factory(event_resync_s=600)
    await api_factory(workers=1, triton_url=triton.grpc_url, poll_interval_s=600, event_resync_s=600)
    alice = await front.user("alice")
    r = await front.client.post(
        "/v1/generations", json={**BODY, "steps": 5}, headers=front.headers(alice, Prefer="wait=120")
    )
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
