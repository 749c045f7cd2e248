"""Follow a generation through the REST API until it reaches a state a test waits for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx

Job = dict[str, Any]


async def poll_job(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    job_id: str,
    until: Callable[[Job], bool],
    *,
    timeout: float = 60.0,
    interval: float = 0.02,
    seen: list[Job] | None = None,
) -> Job:
    """GET the job until ``until(job)``; every response is appended to ``seen`` when given."""
    deadline = time.monotonic() + timeout
    while True:
        r = await client.get(f"/v1/generations/{job_id}", headers=headers)
        assert r.status_code == 200, r.text
        job = r.json()
        if seen is not None:
            seen.append(job)
        if until(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} did not get there in {timeout} s; last seen: {job}")
        await asyncio.sleep(interval)


def finished(job: Job) -> bool:
    return job["status"] in {"succeeded", "failed", "canceled"}


def running(job: Job) -> bool:
    return job["status"] == "running"
