"""In-process workers against a real Triton (or a closed port): retries with backoff, invalid
arguments, cancel, graceful shutdown, and worker ids on hosts with long names."""

from __future__ import annotations

import asyncio
import socket
import time

from sfumato.control_plane.app import create_app
from sfumato.control_plane.models import IdempotencyRecord, Job
from sfumato.control_plane.worker import WORKER_ID_LENGTH, worker_id

from .conftest import make_settings
from .polling import finished, poll_job, running

PROMPT = "a red circle on a white background"
# About 5 s on the 2-core CPU (steps=150 with 8 images takes 26 s), so that a cancel or a
# shutdown lands mid-inference.
LONG = {"prompt": PROMPT, "steps": 60, "num_images": 4}


def _closed_port() -> int:
    """A local port nothing listens on (bound once to pick it, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_triton_is_retried_with_backoff_then_fails(api_factory) -> None:
    backoff = 0.5
    api = await api_factory(
        workers=1,
        triton_url=f"127.0.0.1:{_closed_port()}",
        max_attempts=3,
        retry_backoff_s=backoff,
        poll_interval_s=0.02,
    )
    alice = await api.user("alice")
    started = time.monotonic()
    r = await api.client.post("/v1/generations", json={"prompt": PROMPT}, headers=api.headers(alice))
    assert r.status_code == 202, r.text
    seen: list[dict] = []
    job = await poll_job(api.client, api.headers(alice), r.json()["id"], finished, timeout=30, seen=seen)
    elapsed = time.monotonic() - started

    assert job["status"] == "failed", job
    assert job["attempts"] == 3
    assert "unavailable" in job["error"].lower() or "connect" in job["error"].lower(), job["error"]
    attempts = [s["attempts"] for s in seen]
    assert attempts == sorted(attempts), f"attempts went backwards: {attempts}"
    # Between attempts the job waits in the queue, saying which attempt failed and why.
    waiting = {s["attempts"]: s["error"] for s in seen if s["status"] == "queued" and s["attempts"]}
    assert sorted(waiting) == [1, 2], waiting
    for n, error in waiting.items():
        assert error.startswith(f"attempt {n}: "), error
    # Exponential backoff: 0.5 s after the first failure, 1 s after the second.
    assert elapsed >= backoff + 2 * backoff, f"retried too early: all 3 attempts in {elapsed:.2f} s"


async def test_invalid_arguments_fail_at_once(api_factory, triton) -> None:
    api = await api_factory(workers=1, triton_url=triton.grpc_url, max_attempts=3, retry_backoff_s=0.05)
    alice = await api.user("alice")
    r = await api.client.post(  # the API accepts up to 4096; this model serves far smaller images
        "/v1/generations", json={"prompt": PROMPT, "width": 4096}, headers=api.headers(alice)
    )
    assert r.status_code == 202, r.text
    job = await poll_job(api.client, api.headers(alice), r.json()["id"], finished, timeout=60)
    assert (job["status"], job["attempts"]) == ("failed", 1), job
    assert "width" in job["error"] and "4096" in job["error"], job["error"]
    assert job["images"] == []


async def test_cancel_stops_a_running_job_and_the_worker_goes_on(api_factory, triton) -> None:
    api = await api_factory(workers=1, triton_url=triton.grpc_url, heartbeat_s=0.2, poll_interval_s=0.05)
    alice = await api.user("alice")
    headers = api.headers(alice)
    r = await api.client.post("/v1/generations", json={**LONG, "seed": 1}, headers=headers)
    long_id = r.json()["id"]
    # The same request again, queued behind it: what the worker runs next, and how long the
    # canceled job would have taken.
    r = await api.client.post("/v1/generations", json={**LONG, "seed": 2}, headers=headers)
    next_id = r.json()["id"]
    await poll_job(api.client, headers, long_id, running, timeout=30)
    await asyncio.sleep(0.5)  # well into the Triton call

    asked = time.monotonic()
    r = await api.client.post(f"/v1/generations/{long_id}/cancel", headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["status"] in {"running", "canceled"}
    job = await poll_job(api.client, headers, long_id, finished, timeout=60)
    cancel_s = time.monotonic() - asked
    assert (job["status"], job["error"], job["images"]) == ("canceled", "canceled while running", []), job
    assert job["attempts"] == 1
    r = await api.client.post(f"/v1/generations/{long_id}/cancel", headers=headers)
    assert r.status_code == 409, r.text

    after = await poll_job(api.client, headers, next_id, finished, timeout=120)
    assert (after["status"], after["attempts"], len(after["images"])) == ("succeeded", 1, 4), after
    full_s = after["timings"]["inference_s"]
    print(f"\ncancel took effect in {cancel_s:.2f} s; the same job run to the end took {full_s:.2f} s")
    assert cancel_s < full_s / 2, f"cancel took {cancel_s:.2f} s of a {full_s:.2f} s job"


async def test_shutdown_hands_the_running_job_back(api_factory, database_url, tmp_path, triton) -> None:
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
    exited = False
    try:
        r = await api.client.post("/v1/generations", json={**LONG, "seed": 5}, headers=headers)
        job_id = r.json()["id"]
        await poll_job(api.client, headers, job_id, running, timeout=30)
        await asyncio.sleep(0.5)  # well into the Triton call
        stopping = time.monotonic()
        await lifespan.__aexit__(None, None, None)
        exited = True
        shutdown_s = time.monotonic() - stopping
    finally:
        if not exited:
            await lifespan.__aexit__(None, None, None)

    r = await api.client.get(f"/v1/generations/{job_id}", headers=headers)
    job = r.json()
    assert (job["status"], job["attempts"], job["progress"]) == ("queued", 0, 0.0), job
    async with api.app.state.services.sessions() as session:
        row = await session.get(Job, job_id, populate_existing=True)
        assert row is not None and row.lease_owner is None and row.lease_expires_at is None

    await api_factory(workers=1, triton_url=triton.grpc_url, poll_interval_s=0.05)
    job = await poll_job(api.client, headers, job_id, finished, timeout=120)
    assert (job["status"], job["attempts"], len(job["images"])) == ("succeeded", 1, 4), job
    inference_s = job["timings"]["inference_s"]
    print(f"\nshutdown released the job in {shutdown_s:.2f} s; it then ran for {inference_s:.2f} s")
    assert shutdown_s < inference_s, "shutdown waited for the job instead of releasing it"


async def test_workers_on_a_host_with_a_long_name_claim_jobs(api_factory, monkeypatch) -> None:
    """A Kubernetes pod name has up to 63 characters; the worker ids made from it must still fit
    ``jobs.lease_owner`` (PostgreSQL refused the claim before) and still differ per process.
    The host name is the one thing faked here: it cannot be changed on this machine."""
    host = "sfumato-release-with-a-long-name-worker-6d8f7b9c5d-" + "x7k2p" + "abcdefg"
    assert len(host) == 63
    monkeypatch.setattr(socket, "gethostname", lambda: host)
    ids = [worker_id(i) for i in range(2)]
    assert all(len(i) <= WORKER_ID_LENGTH for i in ids) and len(set(ids)) == 2
    assert all(i.split(":")[0].endswith("-x7k2pabcdefg") for i in ids), ids  # the pod's suffix stays

    api = await api_factory(workers=2, triton_url=f"127.0.0.1:{_closed_port()}", max_attempts=1)
    alice = await api.user("alice")
    r = await api.client.post("/v1/generations", json={"prompt": PROMPT}, headers=api.headers(alice))
    job = await poll_job(api.client, api.headers(alice), r.json()["id"], finished, timeout=30)
    assert (job["status"], job["attempts"]) == ("failed", 1), job  # claimed and run (Triton is absent)


async def test_a_job_deleted_while_running_leaves_no_files(api_factory, triton) -> None:
    api = await api_factory(
        workers=1, triton_url=triton.grpc_url, heartbeat_s=30.0, lease_s=60.0, poll_interval_s=0.05
    )
    alice = await api.user("alice")
    headers = api.headers(alice)
    r = await api.client.post("/v1/generations", json={**LONG, "seed": 3}, headers=headers)
    job_id = r.json()["id"]
    await poll_job(api.client, headers, job_id, running, timeout=30)
    assert (await api.client.delete(f"/v1/generations/{job_id}", headers=headers)).status_code == 204
    # The heartbeat is slow on purpose: the Triton call finishes, the PNGs are written, and only
    # then does the worker find the job gone; it must take its files back.
    store = api.settings.resolved_image_dir / "generations" / job_id
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        if api.app.state.services.metrics.workers_busy._value.get() == 0:  # type: ignore[attr-defined]
            break
    assert api.app.state.services.metrics.workers_busy._value.get() == 0  # type: ignore[attr-defined]
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
