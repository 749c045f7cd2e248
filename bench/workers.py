"""Worker benchmarks: REST throughput with many jobs in flight per worker, fairness, an outage.

Run with ``make bench`` (or ``.venv/bin/python bench/workers.py``). Real processes: a
``tritonserver`` (the demo model, 16 pipeline instances, dynamic batching) and ``sfumato serve``
(uvicorn, SQLite) over HTTP on loopback. Printed as tables and saved as
``bench/results/workers.json``. Every comparison is taken side by side in one run.

* Throughput: the same requests through REST (``Prefer: wait``) at concurrency C and through
  direct gRPC at concurrency C: images/s, p50, p95. REST twice: with the worker holding as many
  jobs as the pipeline has instances (read from Triton), the same without the per-user cap
  (``SFUMATO_MAX_USER_SHARE=1``: one user, so the cap holds the user to 12 of 16 slots), and
  with two workers holding one job each (``SFUMATO_WORKERS=2``, ``SFUMATO_WORKER_CAPACITY=1``:
  how the workers ran before).
* Fairness: one user's 20 maximal jobs (150 steps, 8 images) queued; meanwhile another user
  submits one small job at a time (10 steps, 1 image) until the backlog has drained. The small
  jobs' queued time (submission to claim) against the heavy jobs' own duration; with the
  default per-user share, and with the cap off (the claim order alone).
* Outage: ``tritonserver`` and its stubs SIGKILLed (process group) with jobs accepted and in
  flight, kept down for ``--outage`` seconds while more jobs are submitted, then started again
  on the same ports; every job's outcome and attempts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
REQUEST = {"prompt": "a red circle on a white background", "steps": 25, "guidance_scale": 5.0}
HEAVY = {"prompt": "a blue square on a yellow background", "steps": 150, "num_images": 8}
LIGHT = {"prompt": "a green triangle on a white background", "steps": 10}

sys.path.insert(0, str(ROOT / "bench"))
from serving import export_repo, start_triton  # noqa: E402

from control_plane import ControlPlane, pct  # noqa: E402


def serve(work: Path, triton_url: str, name: str, **env: str) -> ControlPlane:
    data = work / f"{name}-{secrets.token_hex(3)}"
    data.mkdir(parents=True)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # ControlPlane passes os.environ on to `sfumato serve`
    try:
        return ControlPlane(
            database_url=f"sqlite+aiosqlite:///{data / 'db.sqlite'}",
            data_dir=data,
            triton_url=triton_url,
            workers=int(env.get("SFUMATO_WORKERS", "1")),
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


async def closed_loop(call, *, count: int, concurrency: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """``count`` calls of ``call(i)`` from ``concurrency`` clients; images/s and latency."""
    latencies: list[float] = []
    next_index = 0

    async def client() -> None:
        nonlocal next_index
        while next_index < count:
            i = next_index
            next_index += 1
            t0 = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "requests": count,
        "concurrency": concurrency,
        "images_per_s": count / elapsed,
        "p50_s": pct(latencies, 50),
        "p95_s": pct(latencies, 95),
    }


async def rest_load(cp: ControlPlane, *, count: int, concurrency: int, seed0: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=cp.url, headers=cp.headers, timeout=300) as http:

        async def one(i: int) -> None:
            r = await http.post(
                "/v1/generations", json={**REQUEST, "seed": seed0 + i}, headers={"Prefer": "wait=60"}
            )
            assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text

        await closed_loop(one, count=concurrency, concurrency=concurrency)  # warm-up
        return await closed_loop(one, count=count, concurrency=concurrency)


async def grpc_load(triton_url: str, *, count: int, concurrency: int, seed0: int) -> dict[str, Any]:
    import tritonclient.grpc.aio as aio

    from sfumato.clients.triton_grpc import pipeline_inputs

    client = aio.InferenceServerClient(triton_url)

    async def one(i: int) -> None:
        await client.infer("pipeline", pipeline_inputs(aio, seed=seed0 + i, **REQUEST), client_timeout=300)

    try:
        await closed_loop(one, count=concurrency, concurrency=concurrency)  # warm-up
        return await closed_loop(one, count=count, concurrency=concurrency)
    finally:
        await client.close()


async def fairness(cp: ControlPlane, sfumato: str) -> dict[str, Any]:
    import subprocess

    light_key = subprocess.run(
        [sfumato, "admin", "create-key", "--user", "light"],
        env=cp.env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    async with (
        httpx.AsyncClient(base_url=cp.url, headers=cp.headers, timeout=300) as heavy,
        httpx.AsyncClient(
            base_url=cp.url, headers={"Authorization": f"Bearer {light_key}"}, timeout=300
        ) as light,
    ):
        backlog = []
        for i in range(20):
            r = await heavy.post("/v1/generations", json={**HEAVY, "seed": i})
            assert r.status_code == 202, r.text
            backlog.append(r.json()["id"])
        queued: list[float] = []
        while True:
            states = [(await heavy.get(f"/v1/generations/{job_id}")).json() for job_id in backlog]
            if all(s["status"] in {"succeeded", "failed", "canceled"} for s in states):
                break
            r = await light.post(
                "/v1/generations", json={**LIGHT, "seed": len(queued)}, headers={"Prefer": "wait=60"}
            )
            job = r.json()
            assert job["status"] == "succeeded", job
            queued.append(job["timings"]["queued_s"])
        heavy_total = [s["timings"]["total_s"] for s in states]
        heavy_inference = [s["timings"]["inference_s"] for s in states]
    return {
        "light_jobs": len(queued),
        "light_queued_p50_s": pct(queued, 50),
        "light_queued_p95_s": pct(queued, 95),
        "light_queued_max_s": max(queued),
        "heavy_inference_p50_s": pct(heavy_inference, 50),
        "heavy_backlog_drained_s": max(heavy_total),
    }


def _group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


async def outage(cp: ControlPlane, triton: Any, *, seconds: float) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=cp.url, headers=cp.headers, timeout=300) as http:
        ids = []
        for i in range(24):
            r = await http.post("/v1/generations", json={**REQUEST, "num_images": 2, "seed": 1000 + i})
            ids.append(r.json()["id"])
        while (
            sum(
                status == "running"
                for status in [(await http.get(f"/v1/generations/{j}")).json()["status"] for j in ids]
            )
            < 4
        ):
            await asyncio.sleep(0.05)
        pgid = triton.process.pid
        os.killpg(pgid, signal.SIGKILL)
        triton.process.wait()
        killed = time.monotonic()
        while _group(pgid):
            await asyncio.sleep(0.05)
        during = 0
        while time.monotonic() - killed < seconds:  # submissions are accepted during the outage
            r = await http.post("/v1/generations", json={**REQUEST, "num_images": 2, "seed": 2000 + during})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
            during += 1
            await asyncio.sleep(min(10.0, seconds / 6))
        ready = (await http.get("/readyz")).status_code
        await asyncio.to_thread(triton.start, timeout=300)
        restarted = time.monotonic()
        while True:
            jobs = [(await http.get(f"/v1/generations/{j}")).json() for j in ids]
            if all(j["status"] in {"succeeded", "failed", "canceled"} for j in jobs):
                break
            await asyncio.sleep(0.2)
        drained = time.monotonic()
    return {
        "outage_s": restarted - killed,
        "readyz_during_outage": ready,
        "accepted_before": 24,
        "accepted_during": during,
        "succeeded": sum(j["status"] == "succeeded" for j in jobs),
        "failed": sum(j["status"] == "failed" for j in jobs),
        "lost": len(ids) - len(jobs),
        "attempts": sorted({j["attempts"] for j in jobs}),
        "drained_after_restart_s": drained - restarted,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96, help="requests per throughput run")
    parser.add_argument("--outage", type=float, default=120.0, help="seconds Triton stays down")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = ROOT / "var" / "bench-workers"
    work.mkdir(parents=True, exist_ok=True)
    sfumato = str(Path(sys.executable).parent / "sfumato")
    results: dict[str, Any] = {"concurrency": args.concurrency, "requests": args.requests}

    triton = start_triton(export_repo(ROOT / "var" / "bench" / "batched", batching=True), work / "triton")
    # The control planes need Triton's admin key to read the pipeline's instance count (the
    # model configuration is a restricted protocol); without it a worker holds one job at a time.
    os.environ["SFUMATO_TRITON_ADMIN_KEY"] = triton.admin_key
    try:
        c, n = args.concurrency, args.requests
        print(f"throughput at concurrency {c} ...", file=sys.stderr)
        results["grpc"] = asyncio.run(grpc_load(triton.grpc_url, count=n, concurrency=c, seed0=0))
        print(f"  gRPC: {results['grpc']}", file=sys.stderr)
        cp = serve(work, triton.grpc_url, "rest")
        try:
            results["rest"] = asyncio.run(rest_load(cp, count=n, concurrency=c, seed0=0))
        finally:
            cp.stop()
        print(f"  REST: {results['rest']}", file=sys.stderr)
        cp = serve(work, triton.grpc_url, "rest-share-1", SFUMATO_MAX_USER_SHARE="1")
        try:
            results["rest_no_user_cap"] = asyncio.run(rest_load(cp, count=n, concurrency=c, seed0=0))
        finally:
            cp.stop()
        print(f"  REST, no per-user cap: {results['rest_no_user_cap']}", file=sys.stderr)
        cp = serve(work, triton.grpc_url, "rest-2x1", SFUMATO_WORKERS="2", SFUMATO_WORKER_CAPACITY="1")
        try:
            results["rest_two_single_job_workers"] = asyncio.run(
                rest_load(cp, count=n, concurrency=c, seed0=0)
            )
        finally:
            cp.stop()

        print("fairness ...", file=sys.stderr)
        cp = serve(work, triton.grpc_url, "fairness")
        try:
            results["fairness"] = asyncio.run(fairness(cp, sfumato))
        finally:
            cp.stop()
        print(f"  {results['fairness']}", file=sys.stderr)
        cp = serve(work, triton.grpc_url, "fairness-share-1", SFUMATO_MAX_USER_SHARE="1")
        try:
            results["fairness_no_user_cap"] = asyncio.run(fairness(cp, sfumato))
        finally:
            cp.stop()
        print(f"  no per-user cap: {results['fairness_no_user_cap']}", file=sys.stderr)

        print(f"outage of {args.outage:.0f} s ...", file=sys.stderr)
        cp = serve(work, triton.grpc_url, "outage")
        try:
            results["outage"] = asyncio.run(outage(cp, triton, seconds=args.outage))
        finally:
            cp.stop()
    finally:
        triton.stop()

    g, r, old = results["grpc"], results["rest"], results["rest_two_single_job_workers"]
    print(f"\nThroughput, the same {n} requests (25 steps, guidance 5) at concurrency {c}")
    print(f"{'path':<40} {'images/s':>9} {'p50 s':>7} {'p95 s':>7} {'vs gRPC':>8}")
    for label, row in (
        ("direct gRPC", g),
        ("REST, one worker, capacity from Triton", r),
        ("REST, the same, no per-user cap", results["rest_no_user_cap"]),
        ("REST, two workers of one job each", old),
    ):
        ratio = row["images_per_s"] / g["images_per_s"]
        figures = f"{row['images_per_s']:>9.2f} {row['p50_s']:>7.3f} {row['p95_s']:>7.3f} {ratio:>7.2f}x"
        print(f"{label:<40} {figures}")
    print("\nFairness: 20 maximal jobs of one user queued, another user's small jobs one after another")
    for label, key in (("share 0.75 (default)", "fairness"), ("no per-user cap", "fairness_no_user_cap")):
        f = results[key]
        print(
            f"{label}: {f['light_jobs']} small jobs, queued p50 {f['light_queued_p50_s']:.2f} s, p95 "
            f"{f['light_queued_p95_s']:.2f} s, max {f['light_queued_max_s']:.2f} s; a maximal job's "
            f"inference p50 {f['heavy_inference_p50_s']:.2f} s; "
            f"the backlog drained in {f['heavy_backlog_drained_s']:.1f} s"
        )
    o = results["outage"]
    print(
        f"\nOutage: Triton down {o['outage_s']:.0f} s (readyz {o['readyz_during_outage']}); "
        f"{o['accepted_before']} jobs accepted before, {o['accepted_during']} during; "
        f"{o['succeeded']} succeeded, {o['failed']} failed, {o['lost']} lost, attempts {o['attempts']}; "
        f"drained {o['drained_after_restart_s']:.1f} s after the restart"
    )
    (args.out / "workers.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nsaved {args.out / 'workers.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
