"""Jobs outlive a Triton outage, on SQLite and PostgreSQL.

With 28 jobs queued and several in flight on a worker, ``tritonserver`` and its python-backend
stubs are SIGKILLed (its whole process group, so that nothing is orphaned, and their shared
memory regions removed); the test then plays the supervisor (``sfumato up`` is the real one)
and starts Triton again on the same ports once the worker has noticed the outage. Meanwhile
submissions are still accepted. Every job succeeds, none fails, none runs twice visibly: an
outage spends no attempt (each job ends with attempts 1) and each job's images are recorded
once. The session's Triton is the one killed and restarted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from sqlalchemy import select

from sfumato.control_plane.models import Job

from .polling import finished, poll_job
from .test_crash_recovery import _assert_recorded_once
from .test_workers import metric, running_jobs, submit, wait_until

PROMPT = "a red circle on a white background"
BODY = {"prompt": PROMPT, "steps": 40, "num_images": 2}
SHM_PREFIX = "/dev/shm/triton_python_backend_shm_region"


def _group(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _shm_regions(pids: list[int]) -> set[str]:
    """The python backend's shared-memory regions that these processes have mapped."""
    regions = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        regions.update(line.split()[-1] for line in maps.splitlines() if SHM_PREFIX in line)
    return regions


async def test_jobs_outlive_a_triton_outage(api_factory, triton) -> None:
    # All 24 queued before the worker starts: its first claim fills its capacity at once, however
    # slowly a busy machine lets the submissions arrive.
    front = await api_factory(triton_url=triton.grpc_url, max_queued_jobs_per_user=50)
    alice, bob = await front.user("alice"), await front.user("bob")
    owners = {}
    for i in range(24):
        who = (alice, bob)[i % 2]
        owners[await submit(front, who, {**BODY, "seed": i})] = who
    api = await api_factory(
        workers=1,
        triton_url=triton.grpc_url,
        heartbeat_s=0.5,
        poll_interval_s=0.05,
        retry_backoff_s=0.2,
        max_queued_jobs_per_user=50,
    )

    async def several_in_flight() -> int:
        running = await running_jobs(api)
        return len(running) if len(running) >= 4 and len({job.lease_owner for job in running}) == 1 else 0

    in_flight = await wait_until(several_in_flight, timeout=120, what="4 jobs in flight on the worker")
    pgid = triton.process.pid  # Triton runs in a session (and process group) of its own
    group = _group(pgid)
    regions = _shm_regions(group)
    assert len(group) > 1 and regions, "expected tritonserver with its backend stubs and their shared memory"
    os.killpg(pgid, signal.SIGKILL)
    triton.process.wait()
    killed = time.monotonic()
    try:

        async def group_gone() -> bool:
            return not _group(pgid)

        await wait_until(group_gone, timeout=30, what="every process of Triton's group gone")
        for region in regions:
            Path(region).unlink(missing_ok=True)

        # The worker hands back what it held (no attempt spent) and claims nothing while Triton
        # is down; submissions are still accepted, and wait.
        async def nothing_running() -> bool:
            return not await running_jobs(api)

        await wait_until(nothing_running, timeout=60, what="the jobs in flight handed back")
        assert (await api.client.get("/readyz")).status_code == 503
        for i in range(4):
            who = (alice, bob)[i % 2]
            owners[await submit(api, who, {**BODY, "seed": 100 + i})] = who

        async def all_waiting_out_the_outage() -> bool:
            async with api.app.state.services.sessions() as session:  # type: ignore[attr-defined]
                rows = (await session.execute(select(Job.status, Job.outage_since))).all()
            unfinished = [(s, since) for s, since in rows if s != "succeeded"]
            return len(rows) == 28 and all(s == "queued" and since is not None for s, since in unfinished)

        await wait_until(all_waiting_out_the_outage, timeout=60, what="every job waiting out the outage")
    finally:
        await asyncio.to_thread(triton.start, timeout=300)  # the supervisor's part: same ports
    outage_s = time.monotonic() - killed

    jobs = [
        await poll_job(api.client, api.headers(who), job_id, finished, timeout=300, interval=0.1)
        for job_id, who in owners.items()
    ]
    recovered_s = time.monotonic() - killed
    assert [job["status"] for job in jobs] == ["succeeded"] * 28, [
        (j["id"], j["status"], j["error"]) for j in jobs
    ]
    assert {job["attempts"] for job in jobs} == {1}, "an outage must not spend an attempt"
    assert all(job["error"] is None for job in jobs)
    for job in jobs:
        await _assert_recorded_once(api, job["id"], BODY["num_images"], api.settings.resolved_image_dir)

    requeued = await metric(api, "sfumato_job_requeues_total", reason="outage")
    assert requeued >= 1 and requeued == await metric(
        api, "sfumato_pipeline_failures_total", code="UNAVAILABLE"
    )
    assert await metric(api, "sfumato_job_retries_total", reason="UNAVAILABLE") == 0
    assert await metric(api, "sfumato_job_duration_seconds_count", model="pipeline", status="failed") == 0
    assert await metric(api, "sfumato_job_duration_seconds_count", model="pipeline", status="succeeded") == 28
    print(
        f"\nTriton SIGKILLed (process group of {len(group)}) with 24 jobs accepted, {in_flight} in flight "
        f"({int(requeued)} calls handed back); 4 more accepted during the outage; Triton ready again "
        f"{outage_s:.1f} s after the kill; all 28 succeeded {recovered_s:.1f} s after it, attempts 1, "
        "0 failed, 0 lost"
    )
