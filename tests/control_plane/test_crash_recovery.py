"""`sfumato worker` processes against a real Triton: a worker SIGKILLed mid-job loses nothing
(another process finishes the job, recorded exactly once), and SIGTERM hands the job back."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from sfumato.control_plane.models import Image, Job
from sfumato.control_plane.worker import WORKER_ID_LENGTH

from .conftest import SECRET, Api
from .polling import finished, poll_job

PROMPT = "a red circle on a white background"
# Long enough (about 3 s on the 2-core CPU) that the kill lands mid-inference, short enough for
# 10 reps per database.
LONG = {"prompt": PROMPT, "steps": 40, "num_images": 4}
REPS = {"postgresql": 10, "sqlite": 10}


class WorkerProcess:
    """One `sfumato worker` OS process with a single worker, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sfumato.cli", "worker", "--count", "1"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        suffix = f":{self.proc.pid}:0"  # as worker.worker_id(0) names it in that process
        self.worker_id = socket.gethostname()[-(WORKER_ID_LENGTH - len(suffix)) :] + suffix

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        return self.proc.wait(timeout)


def _worker_env(database_url: str, data_dir: Path, triton_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "SFUMATO_DATABASE_URL": database_url,
        "SFUMATO_ENV": "test",
        "SFUMATO_SECRET_KEY": SECRET,
        "SFUMATO_TRITON_URL": triton_url,
        "SFUMATO_DATA_DIR": str(data_dir),
        "SFUMATO_LEASE_S": "2",
        "SFUMATO_HEARTBEAT_S": "0.5",
        "SFUMATO_POLL_INTERVAL_S": "0.1",
        "SFUMATO_RETRY_BACKOFF_S": "0.2",
    }


async def _wait_until_held(
    sessions: async_sessionmaker[AsyncSession], job_id: str, worker: WorkerProcess, timeout: float = 60
) -> None:
    """Until the job is running under ``worker``'s lease (read from the database)."""
    deadline = time.monotonic() + timeout
    while True:
        async with sessions() as session:
            job = await session.get(Job, job_id, populate_existing=True)
            state = (job.status, job.lease_owner) if job is not None else None
        if state == ("running", worker.worker_id):
            return
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited with {worker.proc.returncode}:\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} not held by {worker.worker_id}: {state}\n{worker.log_tail()}")
        await asyncio.sleep(0.05)


def _reclaimed(job: dict) -> bool:
    return job["attempts"] >= 2 or finished(job)


async def _assert_recorded_once(api: Api, job_id: str, num_images: int, image_dir: Path) -> None:
    async with api.app.state.services.sessions() as session:
        job = await session.get(Job, job_id, populate_existing=True)
        rows = (await session.scalars(select(Image).where(Image.job_id == job_id))).all()
    assert job is not None and job.status == "succeeded" and job.lease_owner is None
    assert sorted(img.index for img in rows) == list(range(num_images)), [img.index for img in rows]
    files = sorted(p.name for p in (image_dir / "generations" / job_id).iterdir())
    assert files == [f"{i}.png" for i in range(num_images)], files
    for img in rows:
        data = (image_dir / img.storage_key).read_bytes()
        assert hashlib.sha256(data).hexdigest() == img.sha256, f"{img.storage_key} is not the recorded image"


async def test_killed_worker_job_is_finished_by_the_next_one(
    api_factory, database_url: str, triton, tmp_path: Path
) -> None:
    kind = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    reps = REPS[kind]
    api = await api_factory()  # the API alone; it shares the image store with the worker processes
    image_dir = api.settings.resolved_image_dir
    env = _worker_env(database_url, api.settings.data_dir, triton.grpc_url)
    alice = await api.user("alice")
    headers = api.headers(alice)
    sessions = api.app.state.services.sessions
    spawned = 0

    def spawn() -> WorkerProcess:
        nonlocal spawned
        spawned += 1
        return WorkerProcess(env, tmp_path / f"worker-{spawned}.log")

    accepted: list[str] = []
    reclaim_s: list[float] = []
    recovery_s: list[float] = []
    started = time.monotonic()
    current = spawn()
    try:
        for rep in range(reps):
            r = await api.client.post("/v1/generations", json={**LONG, "seed": rep}, headers=headers)
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            accepted.append(job_id)
            await _wait_until_held(sessions, job_id, current)
            await asyncio.sleep(0.3)  # the Triton call is in flight
            current.proc.kill()
            killed = time.monotonic()
            assert current.proc.wait(10) == -signal.SIGKILL
            # Submitted while no worker is alive: accepted all the same, and run later.
            r = await api.client.post(
                "/v1/generations", json={"prompt": PROMPT, "seed": rep}, headers=headers
            )
            accepted.append(r.json()["id"])
            current = spawn()

            await poll_job(api.client, headers, job_id, _reclaimed, timeout=60, interval=0.05)
            reclaim_s.append(time.monotonic() - killed)
            job = await poll_job(api.client, headers, job_id, finished, timeout=90, interval=0.05)
            recovery_s.append(time.monotonic() - killed)
            assert (job["status"], job["attempts"], job["error"]) == ("succeeded", 2, None), (
                f"rep {rep}: {job}\n{current.log_tail()}"
            )
            assert len(job["images"]) == LONG["num_images"]
            await _assert_recorded_once(api, job_id, LONG["num_images"], image_dir)

        for job_id in accepted:
            job = await poll_job(api.client, headers, job_id, finished, timeout=60, interval=0.05)
            assert job["status"] == "succeeded", job
        assert current.stop(signal.SIGTERM) == 0, current.log_tail()  # an idle worker stops cleanly
    finally:
        if current.proc.poll() is None:
            current.proc.kill()
            current.proc.wait()

    async with sessions() as session:
        statuses = (await session.scalars(select(Job.status))).all()
    assert len(statuses) == len(accepted) and set(statuses) == {"succeeded"}
    print(
        f"\ncrash recovery on {kind}: {reps}/{reps} SIGKILLed jobs succeeded exactly once (attempts 2, "
        f"{LONG['num_images']} images each), {len(accepted)} accepted jobs all succeeded; "
        f"kill -> claimed again median {median(reclaim_s):.2f} s (lease 2 s), "
        f"kill -> succeeded median {median(recovery_s):.2f} s, max {max(recovery_s):.2f} s; "
        f"total {time.monotonic() - started:.1f} s"
    )


async def test_sigterm_hands_the_running_job_back(
    api_factory, database_url: str, triton, tmp_path: Path
) -> None:
    api = await api_factory()
    env = _worker_env(database_url, api.settings.data_dir, triton.grpc_url)
    alice = await api.user("alice")
    headers = api.headers(alice)
    sessions = api.app.state.services.sessions

    first = WorkerProcess(env, tmp_path / "worker-1.log")
    try:
        r = await api.client.post("/v1/generations", json={**LONG, "steps": 60}, headers=headers)
        job_id = r.json()["id"]
        await _wait_until_held(sessions, job_id, first)
        await asyncio.sleep(0.3)
        assert first.stop(signal.SIGTERM, timeout=20) == 0, first.log_tail()
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
            first.proc.wait()
    job = (await api.client.get(f"/v1/generations/{job_id}", headers=headers)).json()
    assert (job["status"], job["attempts"]) == ("queued", 0), job

    second = WorkerProcess(env, tmp_path / "worker-2.log")
    try:
        job = await poll_job(api.client, headers, job_id, finished, timeout=120, interval=0.05)
        assert (job["status"], job["attempts"], len(job["images"])) == ("succeeded", 1, 4), job
    finally:
        second.stop(signal.SIGTERM)
