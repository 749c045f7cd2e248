"""In-process workers against a real Triton (or a closed port), on SQLite and PostgreSQL: many
jobs in flight per worker (and Triton batching them), a dead worker's job re-claimed, transient
errors retried with backoff, invalid arguments, an unreachable Triton (jobs wait, unattempted;
past SFUMATO_MAX_OUTAGE_S they fail saying so), cancel of one of many jobs in flight, shutdown
(jobs handed back; it always ends, even cancelled mid-write), worker ids on hosts with long
names, deleted jobs, and the maintenance sweep. The worker-side metrics are read from /metrics."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import time
from typing import Any

import asyncpg
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.engine import make_url

from sfumato.control_plane import jobs, leases
from sfumato.control_plane.app import create_app
from sfumato.control_plane.auth import Principal
from sfumato.control_plane.models import IdempotencyRecord, Job
from sfumato.control_plane.schemas import GenerationCreate
from sfumato.control_plane.services import Services
from sfumato.control_plane.worker import WORKER_ID_LENGTH, run_workers, worker_id

from .conftest import Api, make_settings
from .polling import finished, poll_job, running

PROMPT = "a red circle on a white background"
# Several seconds on the 2-core CPU with a few of them at once: a cancel or a shutdown lands
# while the Triton call is in flight (the heartbeat acts within 0.2 s).
LONG = {"prompt": PROMPT, "steps": 150, "num_images": 4}


def _closed_port() -> int:
    """A local port nothing listens on (bound once to pick it, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def metric(api: Api, name: str, **labels: str) -> float:
    """One sample of the app's ``/metrics`` (0 when absent)."""
    text = (await api.client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


async def submit(api: Api, who: dict[str, str], body: dict[str, Any]) -> str:
    r = await api.client.post("/v1/generations", json=body, headers=api.headers(who))
    assert r.status_code == 202, r.text
    return r.json()["id"]


async def wait_until(condition, *, timeout: float = 300.0, what: str = "the condition") -> Any:  # type: ignore[no-untyped-def]
    """Await ``condition()`` until it returns something truthy (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        await asyncio.sleep(0.02)


async def running_jobs(api: Api) -> list[Job]:
    async with api.app.state.services.sessions() as session:  # type: ignore[attr-defined]
        return list((await session.scalars(select(Job).where(Job.status == "running"))).all())


def max_overlap(intervals: list[tuple[Any, Any]]) -> int:
    """The most intervals open at one moment."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    open_now = peak = 0
    for _, step in events:
        open_now += step
        peak = max(peak, open_now)
    return peak


async def test_a_worker_keeps_many_jobs_in_flight_and_triton_batches_them(api_factory, triton) -> None:
    import tritonclient.grpc as grpcclient

    # All 16 queued before the worker starts: its first claim takes a full capacity at once (half
    # of it per user), however slowly a busy machine lets the submissions arrive.
    front = await api_factory(triton_url=triton.grpc_url)
    alice, bob = await front.user("alice"), await front.user("bob")
    stats = grpcclient.InferenceServerClient(triton.grpc_url)

    def unet_counts() -> tuple[int, int]:
        model = stats.get_inference_statistics("unet", as_json=True)["model_stats"][0]
        return int(model.get("inference_count", 0)), int(model.get("execution_count", 0))

    before = await asyncio.to_thread(unet_counts)
    ids = [
        await submit(front, (alice, bob)[i % 2], {"prompt": PROMPT, "seed": i, "steps": 25})
        for i in range(16)
    ]
    api = await api_factory(workers=1, triton_url=triton.grpc_url, poll_interval_s=0.05)
    jobs = [
        await poll_job(api.client, api.headers((alice, bob)[i % 2]), job_id, finished, timeout=180)
        for i, job_id in enumerate(ids)
    ]
    rows, executions = (a - b for a, b in zip(await asyncio.to_thread(unet_counts), before, strict=True))
    stats.close()

    assert {job["status"] for job in jobs} == {"succeeded"} and {job["attempts"] for job in jobs} == {1}
    # One worker ran several jobs at once (capacity: the pipeline's 8 instances, from Triton) ...
    assert await metric(api, "sfumato_worker_capacity") == 8
    async with api.app.state.services.sessions() as session:  # type: ignore[attr-defined]
        spans = (await session.execute(select(Job.started_at, Job.finished_at))).all()
    overlap = max_overlap([(start, end) for start, end in spans])
    assert overlap >= 4, f"at most {overlap} jobs ran at once"
    # ... so Triton's dynamic batcher put UNet rows of different REST jobs into one execution.
    assert rows > executions > 0, f"UNet: {rows} rows in {executions} executions"
    print(
        f"\n16 REST jobs: up to {overlap} at once on one worker; "
        f"UNet {rows / executions:.2f} rows per execution"
    )

    assert await metric(api, "sfumato_jobs_in_flight") == 0
    assert await metric(api, "sfumato_job_queue_wait_seconds_count", model="pipeline") == 16
    assert await metric(api, "sfumato_job_duration_seconds_count", model="pipeline", status="succeeded") == 16
    assert await metric(api, "sfumato_job_reclaims_total") == 0


async def test_a_dead_workers_job_is_reclaimed_after_its_lease(api_factory, triton) -> None:
    api = await api_factory()  # no workers yet
    alice = await api.user("alice")
    job_id = await submit(api, alice, {"prompt": PROMPT, "seed": 4})
    async with api.app.state.services.sessions() as session:  # type: ignore[attr-defined]
        [claimed] = await leases.claim(session=session, worker_id="a-worker-that-dies", lease_s=0.5)
    assert claimed.id == job_id

    worker = await api_factory(workers=1, triton_url=triton.grpc_url, poll_interval_s=0.05)
    job = await poll_job(api.client, api.headers(alice), job_id, finished, timeout=60)
    assert (job["status"], job["attempts"], len(job["images"])) == ("succeeded", 2, 1), job
    assert await metric(worker, "sfumato_job_reclaims_total") == 1
    # Its queue wait was counted at its first claim (by the dead worker's process), not again.
    assert await metric(worker, "sfumato_job_queue_wait_seconds_count", model="pipeline") == 0


async def test_transient_errors_retry_with_backoff_then_fail(api_factory, triton) -> None:
    backoff = 0.5
    api = await api_factory(
        workers=1,
        triton_url=triton.grpc_url,
        triton_timeout_s=0.001,  # every pipeline call runs past its deadline
        max_attempts=3,
        retry_backoff_s=backoff,
        poll_interval_s=0.02,
    )
    alice = await api.user("alice")
    started = time.monotonic()
    job_id = await submit(api, alice, {"prompt": PROMPT})
    seen: list[dict] = []
    job = await poll_job(
        api.client, api.headers(alice), job_id, finished, timeout=60, seen=seen, interval=0.01
    )
    elapsed = time.monotonic() - started

    assert (job["status"], job["attempts"]) == ("failed", 3), job
    assert "deadline" in job["error"].lower(), job["error"]
    attempts = [s["attempts"] for s in seen]
    assert attempts == sorted(attempts), f"attempts went backwards: {attempts}"
    # Between attempts the job waits in the queue, saying which attempt failed and why.
    waiting = {s["attempts"]: s["error"] for s in seen if s["status"] == "queued" and s["attempts"]}
    assert sorted(waiting) == [1, 2], waiting
    for n, error in waiting.items():
        assert error.startswith(f"attempt {n}: "), error
    # Exponential backoff: 0.5 s after the first failure, 1 s after the second (a lower bound).
    assert elapsed >= backoff + 2 * backoff, f"retried too early: all 3 attempts in {elapsed:.2f} s"
    assert await metric(api, "sfumato_job_retries_total", reason="DEADLINE_EXCEEDED") == 2
    assert await metric(api, "sfumato_pipeline_failures_total", code="DEADLINE_EXCEEDED") == 3
    assert await metric(api, "sfumato_job_duration_seconds_count", model="pipeline", status="failed") == 1
    assert await metric(api, "sfumato_job_requeues_total", reason="outage") == 0


async def test_invalid_arguments_fail_at_once(api_factory, triton) -> None:
    api = await api_factory(workers=1, triton_url=triton.grpc_url, max_attempts=3, retry_backoff_s=0.05)
    alice = await api.user("alice")
    # The schema accepts up to 4096; this model serves far smaller images, which submission now
    # checks (422 naming width, tests/control_plane/test_registry.py). A job that reaches Triton
    # with a bad field all the same (queued unchecked, while Triton could not say its limits)
    # fails at once with Triton's message.
    r = await api.client.post(
        "/v1/generations", json={"prompt": PROMPT, "width": 4096}, headers=api.headers(alice)
    )
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "width", r.text
    services = api.app.state.services  # type: ignore[attr-defined]
    async with services.sessions() as session:
        job, _ = await jobs.create_job(
            session=session,
            settings=services.settings,
            store=services.store,
            principal=Principal(user_id=alice["id"], name="alice", role="member", via="api_key"),
            body=GenerationCreate(prompt=PROMPT, width=4096),
        )  # no triton: the limits are not checked
    job_id = job.id
    job = await poll_job(api.client, api.headers(alice), job_id, finished, timeout=60)
    assert (job["status"], job["attempts"]) == ("failed", 1), job
    assert "width" in job["error"] and "4096" in job["error"], job["error"]
    assert job["images"] == []
    assert await metric(api, "sfumato_pipeline_failures_total", code="INVALID_ARGUMENT") == 1


async def test_while_triton_is_unreachable_jobs_wait_unattempted(api_factory) -> None:
    api = await api_factory(workers=1, triton_url=f"127.0.0.1:{_closed_port()}", poll_interval_s=0.02)
    alice = await api.user("alice")
    job_id = await submit(api, alice, {"prompt": PROMPT})  # accepted while Triton is down

    async def clock_started() -> bool:
        async with api.app.state.services.sessions() as session:  # type: ignore[attr-defined]
            job = await session.get(Job, job_id, populate_existing=True)
            return job is not None and job.outage_since is not None

    await wait_until(clock_started, what="the worker noticing the outage")
    r = await api.client.get(f"/v1/generations/{job_id}", headers=api.headers(alice))
    assert (r.json()["status"], r.json()["attempts"], r.json()["error"]) == ("queued", 0, None), r.json()
    assert (await api.client.get("/readyz")).status_code == 503
    assert await metric(api, "sfumato_pipeline_failures_total", code="UNAVAILABLE") == 0  # never tried


async def test_an_outage_longer_than_the_limit_fails_the_job_saying_so(api_factory) -> None:
    api = await api_factory(
        workers=1, triton_url=f"127.0.0.1:{_closed_port()}", poll_interval_s=0.02, max_outage_s=0.5
    )
    alice = await api.user("alice")
    job_id = await submit(api, alice, {"prompt": PROMPT})
    job = await poll_job(api.client, api.headers(alice), job_id, finished, timeout=30)
    assert (job["status"], job["attempts"]) == ("failed", 0), job
    assert job["error"].startswith("Triton was unavailable for longer than SFUMATO_MAX_OUTAGE_S (0.5 s)"), job
    assert await metric(api, "sfumato_job_duration_seconds_count", model="pipeline", status="failed") == 1


async def test_cancel_of_one_of_many_jobs_in_flight(api_factory, triton) -> None:
    api = await api_factory(workers=1, triton_url=triton.grpc_url, heartbeat_s=0.2, poll_interval_s=0.05)
    alice = await api.user("alice")
    headers = api.headers(alice)
    ids = [await submit(api, alice, {**LONG, "seed": i}) for i in range(4)]
    running_now = await wait_until(lambda: _several_running(api, ids), timeout=300, what="jobs in flight")
    victim = running_now[-1]

    r = await api.client.post(f"/v1/generations/{victim}/cancel", headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "running"  # flagged; the worker cancels the Triton call
    job = await poll_job(api.client, headers, victim, finished, timeout=60)
    assert (job["status"], job["error"], job["images"], job["attempts"]) == (
        "canceled",
        "canceled while running",
        [],
        1,
    ), job
    assert (await api.client.post(f"/v1/generations/{victim}/cancel", headers=headers)).status_code == 409
    # The other jobs in flight were not disturbed, and the worker goes on.
    for job_id in (i for i in ids if i != victim):
        other = await poll_job(api.client, headers, job_id, finished, timeout=180)
        assert (other["status"], other["attempts"], len(other["images"])) == ("succeeded", 1, 4), other
    after = await poll_job(
        api.client, headers, await submit(api, alice, {"prompt": PROMPT}), finished, timeout=60
    )
    assert after["status"] == "succeeded"
    assert await metric(api, "sfumato_job_duration_seconds_count", model="pipeline", status="canceled") == 1
    assert await metric(api, "sfumato_jobs_in_flight") == 0


async def _several_running(api: Api, ids: list[str], at_least: int = 2) -> list[str]:
    """Those of ``ids`` running on one worker, once there are ``at_least`` (else nothing). Not
    all of them: on a loaded machine the first may finish before the test sees the last start."""
    held = [job for job in await running_jobs(api) if job.id in ids]
    return (
        [job.id for job in held] if len(held) >= at_least and len({j.lease_owner for j in held}) == 1 else []
    )


async def _handed_back(api: Api, who: dict[str, str], ids: list[str]) -> list[dict[str, Any]]:
    """After a shutdown: every job it held is queued again, its attempt not spent (one that had
    finished before stays finished); none is left running."""
    states = [(await api.client.get(f"/v1/generations/{i}", headers=api.headers(who))).json() for i in ids]
    assert all(
        (s["status"], s["attempts"], s["progress"]) in {("queued", 0, 0.0), ("succeeded", 1, 1.0)}
        for s in states
    ), states
    return [s for s in states if s["status"] == "queued"]


async def test_shutdown_hands_the_jobs_in_flight_back(api_factory, database_url, tmp_path, triton) -> None:
    api = await api_factory()  # the API alone; workers come and go beside it
    alice = await api.user("alice")
    headers = api.headers(alice)
    settings = make_settings(
        database_url,
        tmp_path / "worker-app",
        workers=1,
        triton_url=triton.grpc_url,
        heartbeat_s=0.2,
        poll_interval_s=0.05,
    )
    app = create_app(settings)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    try:
        ids = [await submit(api, alice, {**LONG, "seed": 5 + i}) for i in range(4)]
        await wait_until(lambda: _several_running(api, ids), timeout=300, what="jobs in flight")
    finally:
        await asyncio.wait_for(lifespan.__aexit__(None, None, None), 60)

    queued = await _handed_back(api, alice, ids)
    assert len(queued) >= 1
    async with api.app.state.services.sessions() as session:  # type: ignore[attr-defined]
        rows = (await session.scalars(select(Job).where(Job.id.in_(ids)))).all()
        assert all(row.lease_owner is None and row.lease_expires_at is None for row in rows)
    # Each job it had started went back (one submitted last may not have been claimed yet).
    requeued = app.state.services.metrics.job_requeues.labels(reason="shutdown")._value.get()  # type: ignore[attr-defined]
    assert requeued == sum(job["started_at"] is not None for job in queued) >= 1

    await api_factory(workers=1, triton_url=triton.grpc_url, poll_interval_s=0.05)
    for job_id in ids:
        job = await poll_job(api.client, headers, job_id, finished, timeout=300)
        assert (job["status"], job["attempts"], len(job["images"])) == ("succeeded", 1, 4), job


async def _no_write_lock_left(database_url: str) -> None:
    """Nothing holds the database after the workers are gone: on SQLite the write lock is free
    (BEGIN IMMEDIATE succeeds without waiting), on PostgreSQL no session sits in a transaction."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        connection = sqlite3.connect(url.database, timeout=0, isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("ROLLBACK")
        finally:
            connection.close()
        return
    connection = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        stuck = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
        )
    finally:
        await connection.close()
    assert stuck == 0, f"{stuck} sessions left in a transaction"


async def test_shutdown_always_ends_with_jobs_heartbeats_and_triton_calls_in_flight(
    api_factory, database_url, tmp_path, triton
) -> None:
    """The hang of issue 8: a task that did not end when cancelled. Heartbeats every 10 ms keep
    database writes in flight; the app is shut down (and, second, the workers' task cancelled
    outright) while jobs are mid-call. Both must end, leave no lock behind, and lose no job. The
    60 s bound is a safety net, not a timing claim."""
    api = await api_factory()
    alice = await api.user("alice")
    hurried = {"triton_url": triton.grpc_url, "heartbeat_s": 0.01, "poll_interval_s": 0.01, "workers": 1}

    # 1. The app's own shutdown (lifespan exit).
    app = create_app(make_settings(database_url, tmp_path / "a", **hurried))
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    try:
        ids = [await submit(api, alice, {**LONG, "seed": 20 + i}) for i in range(4)]
        await wait_until(lambda: _several_running(api, ids), timeout=300, what="jobs in flight")
    finally:
        await asyncio.wait_for(lifespan.__aexit__(None, None, None), 60)
    await _no_write_lock_left(database_url)
    assert await _handed_back(api, alice, ids)

    # 2. Cancelled outright, as a server that gives up on a graceful stop would.
    services = Services.build(make_settings(database_url, tmp_path / "b", **hurried))
    workers = asyncio.create_task(run_workers(services, count=1, stop=asyncio.Event()))
    try:
        await wait_until(
            lambda: _several_running(api, ids, at_least=1), timeout=300, what="jobs running again"
        )
    finally:
        workers.cancel()
        done, _ = await asyncio.wait((workers,), timeout=60)
        await services.close()
    assert workers in done, "the workers' task did not end within 60 s of being cancelled"
    assert workers.cancelled()
    await _no_write_lock_left(database_url)
    # Handed back, not lost: every job is queued again with no attempt spent (or finished).
    assert await _handed_back(api, alice, ids)


async def test_workers_on_a_host_with_a_long_name_claim_jobs(api_factory, triton, monkeypatch) -> None:
    """A Kubernetes pod name has up to 63 characters; the worker ids made from it must still fit
    ``jobs.lease_owner`` (PostgreSQL refused the claim before) and still differ per process.
    The host name is the one thing faked here: it cannot be changed on this machine."""
    host = "sfumato-release-with-a-long-name-worker-6d8f7b9c5d-" + "x7k2p" + "abcdefg"
    assert len(host) == 63
    monkeypatch.setattr(socket, "gethostname", lambda: host)
    ids = [worker_id(i) for i in range(2)]
    assert all(len(i) <= WORKER_ID_LENGTH for i in ids) and len(set(ids)) == 2
    assert all(i.split(":")[0].endswith("-x7k2pabcdefg") for i in ids), ids  # the pod's suffix stays

    api = await api_factory(workers=2, triton_url=triton.grpc_url, poll_interval_s=0.05)
    alice = await api.user("alice")
    job = await poll_job(
        api.client, api.headers(alice), await submit(api, alice, {"prompt": PROMPT}), finished, timeout=60
    )
    assert (job["status"], job["attempts"]) == ("succeeded", 1), job


async def test_a_job_deleted_while_running_leaves_no_files(api_factory, triton) -> None:
    api = await api_factory(
        workers=1, triton_url=triton.grpc_url, heartbeat_s=30.0, lease_s=60.0, poll_interval_s=0.05
    )
    alice = await api.user("alice")
    headers = api.headers(alice)
    job_id = await submit(api, alice, {**LONG, "steps": 60, "seed": 3})
    await poll_job(api.client, headers, job_id, running, timeout=30)
    assert (await api.client.delete(f"/v1/generations/{job_id}", headers=headers)).status_code == 204
    # The heartbeat is slow on purpose: the Triton call finishes, the PNGs are written, and only
    # then does the worker find the job gone; it must take its files back.
    store = api.settings.resolved_image_dir / "generations" / job_id

    async def idle() -> bool:
        return await metric(api, "sfumato_jobs_in_flight") == 0

    await wait_until(idle, timeout=60, what="the worker letting go of the job")
    assert not store.exists() or not any(store.iterdir()), sorted(p.name for p in store.iterdir())


async def test_workers_maintenance_sweeps_expired_idempotency_keys(api_factory) -> None:
    # Workers run the sweep every SFUMATO_MAINTENANCE_INTERVAL_S, whether or not Triton is up.
    api = await api_factory(
        workers=1, triton_url=f"127.0.0.1:{_closed_port()}", idempotency_ttl_s=1, maintenance_interval_s=0.2
    )
    alice = await api.user("alice")
    r = await api.client.post(
        "/v1/generations",
        json={"prompt": PROMPT},
        headers=api.headers(alice, **{"Idempotency-Key": "sweep-me"}),
    )
    assert r.status_code == 202
    async with api.app.state.services.sessions() as session:
        assert await session.get(IdempotencyRecord, (alice["id"], "sweep-me")) is not None
    deadline = time.monotonic() + 10
    while True:
        async with api.app.state.services.sessions() as session:
            if await session.get(IdempotencyRecord, (alice["id"], "sweep-me")) is None:
                break
        assert time.monotonic() < deadline, "the expired key was not swept within 10 s"
        await asyncio.sleep(0.1)
    async with api.app.state.services.sessions() as session:
        assert await session.get(Job, r.json()["id"]) is not None  # the job itself stays
