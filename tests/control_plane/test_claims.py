"""The lease protocol on a real database, SQLite and PostgreSQL (no Triton): every job is claimed
exactly once by concurrent batch claimers, in one process and across processes; claims are fair
across owners and a worker keeps slots free for other users; one heartbeat statement
extends many leases and reports cancels and losses; an expired lease moves a job to the next
worker while the first one's late results are discarded; the outage clock requeues without
spending attempts and fails a job that waited too long, saying so."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from sfumato.control_plane import leases
from sfumato.control_plane.db import create_engine, session_factory
from sfumato.control_plane.models import Image, Job, utcnow

PROMPT = "a red circle on a white background"

# A claimer in an OS process of its own: opens its engines, says "ready", waits for "go" on
# stdin, then claims batches of 1 to 4 jobs until a claim comes back empty and prints
# {worker_id: [job ids]} as JSON.
CLAIMER = """
import asyncio, json, sys
from sfumato.control_plane import leases
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
                batch = await leases.claim(
                    session=session, worker_id=worker_id, lease_s=600, limit=1 + len(got) % 4
                )
            if not batch:
                return got
            got.extend(job.id for job in batch)

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
                batch = await leases.claim(
                    session=session, worker_id=worker_id, lease_s=600, limit=1 + len(got) % 4
                )
            if not batch:
                return got
            assert all(job.attempts == 1 and not job.reclaimed for job in batch)
            got.extend(job.id for job in batch)
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
    line = await asyncio.wait_for(proc.stdout.readline(), 300)
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
    # all released at the same moment, each claiming batches of 1 to 4 jobs. (On PostgreSQL a
    # claimer can come back empty while others hold the owners it would take from; one of those
    # others always goes on, so the last claimer standing finds the queue empty.)
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
        out, _ = await asyncio.wait_for(proc.communicate(), 300)
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
        [a] = await leases.claim(session=session, worker_id="worker-a", lease_s=1.5)
    assert (a.id, a.attempts, a.reclaimed) == (job_id, 1, False)
    assert a.queue_wait_s is not None and a.queue_wait_s >= 0  # its first claim
    async with sessions() as session:  # A's lease still holds
        assert await leases.claim(session=session, worker_id="worker-b", lease_s=30) == []

    await _wait_for_lease_expiry(sessions, job_id)  # A stalls past its lease
    async with sessions() as session:
        [b] = await leases.claim(session=session, worker_id="worker-b", lease_s=30)
    assert (b.id, b.attempts, b.reclaimed, b.queue_wait_s) == (job_id, 2, True, None)
    async with sessions() as session:
        row = await session.get(Job, job_id)
        assert row is not None and (row.lease_owner, row.status) == ("worker-b", "running")

    # A comes back: its heartbeat learns the job is lost, and nothing it says is recorded.
    async with sessions() as session:
        verdicts = await leases.heartbeat(session=session, worker_id="worker-a", job_ids=[job_id], lease_s=30)
    assert verdicts == {job_id: "lost"}
    async with sessions() as session:
        done = await leases.complete(
            session=session,
            job_id=job_id,
            worker_id="worker-a",
            images=_image_rows(job_id, "a", 2),
            inference_s=9.0,
        )
    assert done is None
    async with sessions() as session:
        assert not await leases.finish(
            session=session, job_id=job_id, worker_id="worker-a", status="failed", error="late"
        )
    async with sessions() as session:
        assert not await leases.retry_later(
            session=session, job_id=job_id, worker_id="worker-a", delay_s=0, error="late"
        )
    async with sessions() as session:
        assert not await leases.requeue(
            session=session, job_id=job_id, worker_id="worker-a", delay_s=0, max_outage_s=600, error="late"
        )
    async with sessions() as session:
        assert not await leases.release(session=session, job_id=job_id, worker_id="worker-a")
    async with sessions() as session:
        job = await session.get(Job, job_id, populate_existing=True)
        assert job is not None
        assert (job.status, job.lease_owner, job.attempts, job.error) == ("running", "worker-b", 2, None)
        assert await session.scalar(select(func.count()).select_from(Image)) == 0

    # B's heartbeat still holds, B's completion is recorded, and only once.
    async with sessions() as session:
        verdicts = await leases.heartbeat(session=session, worker_id="worker-b", job_ids=[job_id], lease_s=30)
    assert verdicts == {job_id: None}
    async with sessions() as session:
        ended = await leases.complete(
            session=session,
            job_id=job_id,
            worker_id="worker-b",
            images=_image_rows(job_id, "b", 2),
            inference_s=1.5,
        )
    assert ended is not None and (ended.id, ended.status) == (job_id, "succeeded")
    async with sessions() as session:
        assert not await leases.complete(
            session=session,
            job_id=job_id,
            worker_id="worker-b",
            images=_image_rows(job_id, "b", 2),
            inference_s=1.5,
        )
    async with sessions() as session:  # a finished job is never claimable again
        assert await leases.claim(session=session, worker_id="worker-c", lease_s=30) == []
        assert await session.scalar(select(func.count()).select_from(Image)) == 2

    r = await api.client.get(f"/v1/generations/{job_id}", headers=api.headers(alice))
    out = r.json()
    assert (out["status"], out["attempts"], out["timings"]["inference_s"]) == ("succeeded", 2, 1.5)
    assert [img["sha256"][:2] for img in out["images"]] == ["b0", "b1"]


async def _wait_for_lease_expiry(sessions: async_sessionmaker[AsyncSession], job_id: str) -> None:
    """Until the job's lease has expired by the database's clock (no fixed sleep)."""
    while True:
        async with sessions() as session:
            job = await session.get(Job, job_id, populate_existing=True)
        assert job is not None and job.lease_expires_at is not None
        if job.lease_expires_at < utcnow():
            return
        await asyncio.sleep((job.lease_expires_at - utcnow()).total_seconds() + 0.01)


async def _submit_many(api: Any, who: dict[str, str], count: int, tag: str) -> list[str]:
    ids = []
    for i in range(count):
        r = await api.client.post(
            "/v1/generations", json={"prompt": f"{PROMPT} {tag}{i}"}, headers=api.headers(who)
        )
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    return ids


async def _claim(api: Any, worker: str, limit: int, per_owner: int | None = None) -> list[str]:
    async with api.app.state.services.sessions() as session:
        batch = await leases.claim(
            session=session, worker_id=worker, lease_s=600, limit=limit, per_owner=per_owner
        )
    return [job.id for job in batch]


async def test_a_light_user_goes_before_a_heavy_users_backlog(api) -> None:
    heavy, light = await api.user("heavy"), await api.user("light")
    backlog = await _submit_many(api, heavy, 20, "h")
    # A worker with 4 slots takes the heavy user's 4 oldest jobs (nobody else is waiting) ...
    assert await _claim(api, "w1", limit=4) == backlog[:4]
    # ... then the light user submits one job, after the whole backlog.
    [small] = await _submit_many(api, light, 1, "l")
    # The next slot that frees goes to the light user's job: it has nothing running, the heavy
    # user has 4, however much more the heavy user has queued.
    assert await _claim(api, "w1", limit=1) == [small]
    # Then the backlog resumes in order.
    assert await _claim(api, "w2", limit=3) == backlog[4:7]
    async with api.app.state.services.sessions() as session:
        started = dict(
            (await session.execute(select(Job.id, Job.status).where(Job.status == "queued"))).all()
        )
    assert small not in started and len(started) == 13  # 13 of the heavy backlog still wait


async def test_one_claim_interleaves_owners_round_robin(api) -> None:
    a, b, c = await api.user("a"), await api.user("b"), await api.user("c")
    a_ids = await _submit_many(api, a, 5, "a")
    b_ids = await _submit_many(api, b, 5, "b")
    c_ids = await _submit_many(api, c, 1, "c")
    # Slot n of every owner before slot n + 1 of anyone; within a slot, the older job first.
    assert await _claim(api, "w", limit=7) == [
        a_ids[0],
        b_ids[0],
        c_ids[0],
        a_ids[1],
        b_ids[1],
        a_ids[2],
        b_ids[2],
    ]
    # Owners with fewer jobs running go first: a and b have 3 running now, c has 1.
    c_more = await _submit_many(api, c, 2, "c")
    assert await _claim(api, "w", limit=3) == [c_more[0], c_more[1], a_ids[3]]


async def test_a_worker_keeps_slots_free_for_other_users(api) -> None:
    heavy, light = await api.user("heavy"), await api.user("light")
    backlog = await _submit_many(api, heavy, 20, "h")
    # A worker with 8 slots and a per-user share of 6: the heavy user gets 6 of them, even with
    # nobody else waiting ...
    assert await _claim(api, "w1", limit=8, per_owner=6) == backlog[:6]
    # ... so a light user's job starts at the next claim, without waiting for a slot to free.
    [small] = await _submit_many(api, light, 1, "l")
    assert await _claim(api, "w1", limit=2, per_owner=6) == [small]
    # The cap is per worker: another worker takes its own share of the backlog.
    assert await _claim(api, "w2", limit=8, per_owner=6) == backlog[6:12]
    async with api.app.state.services.sessions() as session:
        held = (
            await session.execute(
                select(Job.lease_owner, Job.owner_id, func.count())
                .where(Job.status == "running")
                .group_by(Job.lease_owner, Job.owner_id)
            )
        ).all()
    assert sorted(held) == sorted([("w1", heavy["id"], 6), ("w1", light["id"], 1), ("w2", heavy["id"], 6)])


async def test_one_heartbeat_extends_every_lease_and_reports_cancels_and_losses(api) -> None:
    alice = await api.user("alice")
    ids = await _submit_many(api, alice, 4, "x")
    sessions = api.app.state.services.sessions
    async with sessions() as session:
        held = [job.id for job in await leases.claim(session=session, worker_id="w", lease_s=5, limit=4)]
    assert held == ids
    async with sessions() as session:
        before = dict((await session.execute(select(Job.id, Job.lease_expires_at))).all())
    keep, cancel, delete, stolen = ids
    r = await api.client.post(f"/v1/generations/{cancel}/cancel", headers=api.headers(alice))
    assert r.status_code == 200 and r.json()["status"] == "running"  # flagged for its worker
    assert (
        await api.client.delete(f"/v1/generations/{delete}", headers=api.headers(alice))
    ).status_code == 204
    async with sessions() as session:  # another worker took this one over
        await session.execute(update(Job).where(Job.id == stolen).values(lease_owner="other"))
        await session.commit()

    async with sessions() as session:
        verdicts = await leases.heartbeat(session=session, worker_id="w", job_ids=ids, lease_s=600)
    assert verdicts == {keep: None, cancel: "cancel", delete: "lost", stolen: "lost"}
    async with sessions() as session:
        after = dict((await session.execute(select(Job.id, Job.lease_expires_at))).all())
    assert after[keep] > before[keep] and after[cancel] > before[cancel]  # both extended
    assert after[stolen] == before[stolen]  # not ours: untouched


async def test_outage_requeues_without_spending_attempts_then_fails_saying_so(api) -> None:
    alice = await api.user("alice")
    [job_id] = await _submit_many(api, alice, 1, "o")
    sessions = api.app.state.services.sessions

    async def claim_it() -> None:
        async with sessions() as session:
            assert [job.id for job in await leases.claim(session=session, worker_id="w", lease_s=60)] == [
                job_id
            ]

    async def row() -> Job:
        async with sessions() as session:
            job = await session.get(Job, job_id, populate_existing=True)
        assert job is not None
        return job

    for _ in range(3):  # three calls that found Triton unavailable: no attempt spent
        await claim_it()
        async with sessions() as session:
            outcome = await leases.requeue(
                session=session,
                job_id=job_id,
                worker_id="w",
                delay_s=0,
                max_outage_s=600,
                error="Socket closed",
            )
        assert outcome == "queued"
        job = await row()
        assert (job.status, job.attempts, job.lease_owner) == ("queued", 0, None)
        assert job.error is not None and "waiting for Triton" in job.error and "Socket closed" in job.error
    first_failure = job.outage_since
    assert first_failure is not None  # counted from the first of those failures
    await claim_it()
    async with sessions() as session:
        ended = await leases.requeue(
            session=session, job_id=job_id, worker_id="w", delay_s=0, max_outage_s=0, error="Socket closed"
        )
    assert isinstance(ended, leases.Ended) and ended.status == "failed"
    job = await row()
    assert job.status == "failed" and job.outage_since == first_failure and job.attempts == 1
    assert job.error is not None and job.error.startswith("Triton was unavailable for ")
    assert "SFUMATO_MAX_OUTAGE_S" in job.error and "Socket closed" in job.error


async def test_outage_clock_of_waiting_jobs(api) -> None:
    alice = await api.user("alice")
    served, waiting, later = await _submit_many(api, alice, 3, "w")
    sessions = api.app.state.services.sessions
    async with sessions() as session:  # `later` is in a retry backoff: not due yet
        await session.execute(
            update(Job).where(Job.id == later).values(available_at=utcnow() + timedelta(hours=1))
        )
        await session.commit()

    async def clocks() -> dict[str, Any]:
        async with sessions() as session:
            return dict((await session.execute(select(Job.id, Job.outage_since))).all())

    # A worker finds Triton down: the clocks of the due jobs start.
    async with sessions() as session:
        assert await leases.outage_tick(session=session, max_outage_s=600, problem="Triton down") == []
    first = await clocks()
    assert first[served] is not None and first[waiting] is not None and first[later] is None
    # Triton serves a job meanwhile (it came back, or only this worker cannot reach it) ...
    async with sessions() as session:
        [job] = await leases.claim(session=session, worker_id="w", lease_s=60)
    assert job.id == served
    async with sessions() as session:
        assert await leases.complete(session=session, job_id=served, worker_id="w", images=[], inference_s=1)
    # ... so at the next outage the waiting job's clock starts afresh.
    async with sessions() as session:
        assert await leases.outage_tick(session=session, max_outage_s=600, problem="Triton down") == []
    second = await clocks()
    assert second[waiting] is not None and second[waiting] > first[waiting]
    # A long outage: the waiting job fails, saying why; the one not due yet is left alone.
    async with sessions() as session:
        ended = await leases.outage_tick(session=session, max_outage_s=0, problem="Triton down")
    assert [(e.id, e.status) for e in ended] == [(waiting, "failed")]
    r = await api.client.get(f"/v1/generations/{waiting}", headers=api.headers(alice))
    job = r.json()
    assert (job["status"], job["attempts"]) == ("failed", 0)
    assert "SFUMATO_MAX_OUTAGE_S" in job["error"] and "Triton down" in job["error"]
    r = await api.client.get(f"/v1/generations/{later}", headers=api.headers(alice))
    assert r.json()["status"] == "queued"
