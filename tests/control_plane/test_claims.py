"""Job claims and leases on a real database (no Triton): every job is claimed exactly once by
concurrent claimers, in one process and across processes, and an expired lease moves a job to
the next worker while the first one's late results are discarded."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from typing import Any

from sqlalchemy import func, select

from sfumato.control_plane import jobs
from sfumato.control_plane.db import create_engine, session_factory
from sfumato.control_plane.models import Image, Job

PROMPT = "a red circle on a white background"

# A claimer in an OS process of its own: opens its engines, says "ready", waits for "go" on
# stdin, then claims until nothing is left and prints {worker_id: [job ids]} as JSON.
CLAIMER = """
import asyncio, json, sys
from sfumato.control_plane import jobs
from sfumato.control_plane.db import create_engine, session_factory

async def main(url: str, prefix: str, tasks: int) -> None:
    engines = [create_engine(url) for _ in range(tasks)]
    for engine in engines:
        async with engine.connect():
            pass
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    async def claim(worker_id: str, engine) -> list[str]:
        sessions, got = session_factory(engine), []
        while True:
            async with sessions() as session:
                job = await jobs.claim_next(session=session, worker_id=worker_id, lease_s=600)
            if job is None:
                return got
            got.append(job.id)

    ids = [f"{prefix}-{i}" for i in range(tasks)]
    results = await asyncio.gather(*(claim(w, e) for w, e in zip(ids, engines)))
    for engine in engines:
        await engine.dispose()
    print(json.dumps(dict(zip(ids, results))), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def _claim_all(url: str, worker_id: str, go: asyncio.Event) -> list[str]:
    engine = create_engine(url)
    sessions = session_factory(engine)
    got: list[str] = []
    try:
        async with engine.connect():
            pass
        await go.wait()
        while True:
            async with sessions() as session:
                job = await jobs.claim_next(session=session, worker_id=worker_id, lease_s=600)
            if job is None:
                return got
            assert job.lease_owner == worker_id and job.status == "running"
            got.append(job.id)
    finally:
        await engine.dispose()


async def _start_claimer_process(url: str, prefix: str, tasks: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLAIMER,
        url,
        prefix,
        str(tasks),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert line.strip() == b"ready", line
    return proc


async def test_every_job_is_claimed_exactly_once(api_factory, database_url: str) -> None:
    api = await api_factory(max_queued_jobs_per_user=20)
    users = [await api.user(f"user{i}") for i in range(10)]

    async def submit(i: int) -> str:
        who = users[i % len(users)]
        body = {"prompt": PROMPT, "seed": i, "steps": 5}
        r = await api.client.post("/v1/generations", json=body, headers=api.headers(who))
        assert r.status_code == 202, r.text
        return r.json()["id"]

    submitted = await asyncio.gather(*(submit(i) for i in range(200)))
    assert len(set(submitted)) == 200

    # 8 claimers here, each with its own engine, and 2 OS processes with 4 claimers each,
    # all released at the same moment.
    processes = [await _start_claimer_process(database_url, f"proc{p}", 4) for p in range(2)]
    go = asyncio.Event()
    local = [asyncio.create_task(_claim_all(database_url, f"task{i}", go)) for i in range(8)]
    await asyncio.sleep(0.5)  # let the local claimers connect
    go.set()
    for proc in processes:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
    claims: dict[str, list[str]] = {f"task{i}": ids for i, ids in enumerate(await asyncio.gather(*local))}
    for proc in processes:
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0
        claims.update(json.loads(out))

    claimed = [job_id for ids in claims.values() for job_id in ids]
    duplicates = [job_id for job_id, n in Counter(claimed).items() if n > 1]
    assert not duplicates, f"claimed more than once: {duplicates[:5]}"
    assert sorted(claimed) == sorted(submitted), "a job was lost or an unknown job was claimed"
    busy = {worker for worker, ids in claims.items() if ids}
    print(f"\n{database_url.split(':')[0]}: 200 jobs over {len(busy)} of {len(claims)} claimers")

    owner_of = {job_id: worker for worker, ids in claims.items() for job_id in ids}
    async with api.app.state.services.sessions() as session:
        rows = (await session.execute(select(Job.id, Job.status, Job.lease_owner, Job.attempts))).all()
    assert len(rows) == 200
    for job_id, status, lease_owner, attempts in rows:
        assert (status, attempts) == ("running", 1), job_id
        assert lease_owner == owner_of[job_id], f"{job_id}: DB says {lease_owner}, claimer {owner_of[job_id]}"


def _image_rows(job_id: str, tag: str, count: int) -> list[dict[str, Any]]:
    return [
        {
            "index": i,
            "storage_key": f"generations/{job_id}/{tag}-{i}.png",
            "seed": 1000 + i,
            "width": 32,
            "height": 32,
            "sha256": f"{tag}{i}".ljust(64, "0"),
        }
        for i in range(count)
    ]


async def test_expired_lease_moves_the_job_and_the_late_worker_records_nothing(api) -> None:
    alice = await api.user("alice")
    r = await api.client.post(
        "/v1/generations", json={"prompt": PROMPT, "num_images": 2}, headers=api.headers(alice)
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    sessions = api.app.state.services.sessions

    async with sessions() as session:
        a = await jobs.claim_next(session=session, worker_id="worker-a", lease_s=1.5)
    assert a is not None and a.id == job_id and a.attempts == 1
    async with sessions() as session:  # A's lease still holds
        assert await jobs.claim_next(session=session, worker_id="worker-b", lease_s=30) is None

    await asyncio.sleep(2.0)  # A stalls past its lease
    async with sessions() as session:
        b = await jobs.claim_next(session=session, worker_id="worker-b", lease_s=30)
    assert b is not None and b.id == job_id
    assert (b.attempts, b.lease_owner, b.status) == (2, "worker-b", "running")

    # A comes back: its heartbeat learns the job is lost, and nothing it says is recorded.
    async with sessions() as session:
        verdict = await jobs.extend_lease(session=session, job_id=job_id, worker_id="worker-a", lease_s=30)
    assert verdict == "lost"
    async with sessions() as session:
        done = await jobs.complete_job(
            session=session,
            job_id=job_id,
            worker_id="worker-a",
            images=_image_rows(job_id, "a", 2),
            inference_s=9.0,
        )
    assert done is False
    async with sessions() as session:
        assert not await jobs.finish_job(
            session=session, job_id=job_id, worker_id="worker-a", status="failed", error="late"
        )
    async with sessions() as session:
        assert not await jobs.retry_later(
            session=session, job_id=job_id, worker_id="worker-a", delay_s=0, error="late"
        )
    async with sessions() as session:
        assert not await jobs.release_job(session=session, job_id=job_id, worker_id="worker-a")
    async with sessions() as session:
        job = await session.get(Job, job_id, populate_existing=True)
        assert job is not None
        assert (job.status, job.lease_owner, job.attempts, job.error) == ("running", "worker-b", 2, None)
        assert await session.scalar(select(func.count()).select_from(Image)) == 0

    # B's heartbeat still holds, B's completion is recorded, and only once.
    async with sessions() as session:
        verdict = await jobs.extend_lease(session=session, job_id=job_id, worker_id="worker-b", lease_s=30)
    assert verdict is None
    async with sessions() as session:
        assert await jobs.complete_job(
            session=session,
            job_id=job_id,
            worker_id="worker-b",
            images=_image_rows(job_id, "b", 2),
            inference_s=1.5,
        )
    async with sessions() as session:
        assert not await jobs.complete_job(
            session=session,
            job_id=job_id,
            worker_id="worker-b",
            images=_image_rows(job_id, "b", 2),
            inference_s=1.5,
        )
    async with sessions() as session:  # a finished job is never claimable again
        assert await jobs.claim_next(session=session, worker_id="worker-c", lease_s=30) is None
        assert await session.scalar(select(func.count()).select_from(Image)) == 2

    r = await api.client.get(f"/v1/generations/{job_id}", headers=api.headers(alice))
    out = r.json()
    assert (out["status"], out["attempts"], out["timings"]["inference_s"]) == ("succeeded", 2, 1.5)
    assert [img["sha256"][:2] for img in out["images"]] == ["b0", "b1"]
