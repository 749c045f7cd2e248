"""Event-driven REST benchmarks (issue 9): REST against direct gRPC, reads, submissions.

Run with ``make bench`` (or ``.venv/bin/python bench/events.py``; ``--quick`` for a short run).
Real processes: a ``tritonserver`` (the demo model, 16 pipeline instances, dynamic batching) and
``sfumato serve`` (uvicorn, one in-process worker, SQLite or PostgreSQL) over HTTP on loopback.
Printed as tables, saved as ``bench/results/events.json`` and ``bench/results/events.png``.
Every ratio is taken side by side in one run.

* Throughput at concurrency C (16): the same requests (25 steps, guidance 5) through direct gRPC
  (``pipeline``) and through REST ``Prefer: wait`` (the worker streaming from ``pipeline_stream``,
  and with ``SFUMATO_WORKER_STREAMING=false`` calling ``pipeline``; and with the per-user share
  off, since one user alone is held to 12 of the 16 slots), on SQLite and PostgreSQL.
  gRPC runs before and after the REST runs; the ratio is against their mean.
* Latency at concurrency 1: REST ``Prefer: wait`` and gRPC requests interleaved, p50 and p95.
* Reads: ``GET /v1/generations/{id}`` open loop at ``--rate`` (200) req/s for ``--duration``
  (60) s on each database (p50 / p99 / errors / shed), and a ramp to find where shedding starts.
* Submissions/s on each database at concurrency 16, and an in-process profile (cProfile) of
  the submission path, summed by where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))

from serving import export_repo, start_triton  # noqa: E402
from workers import grpc_load, rest_load  # noqa: E402

from control_plane import (  # noqa: E402
    REQUEST,
    ControlPlane,
    _pg_create,
    _pg_drop,
    pg_url,
    reads_at_rate,
    rest_vs_grpc,
    submissions,
)


def control_plane(work: Path, db: str, triton: Any, name: str, **env: str) -> tuple[ControlPlane, str | None]:
    """``sfumato serve`` on a fresh database of kind ``db``, talking to ``triton`` (a started
    server, or ``None``: no Triton). It gets Triton's admin key: without it the worker cannot
    read the pipeline's instance count from the (restricted) model configuration and falls back
    to one job in flight, which is what made REST look half as fast as gRPC before."""
    data = work / f"{name}-{db}-{secrets.token_hex(3)}"
    data.mkdir(parents=True)
    pg_name = None
    if db == "postgresql":
        pg_name = asyncio.run(_pg_create())
        url = pg_url(pg_name)
    else:
        url = f"sqlite+aiosqlite:///{data / 'db.sqlite'}"
    if triton is not None:
        env["SFUMATO_TRITON_ADMIN_KEY"] = triton.admin_key
    cp = ControlPlane(
        database_url=url,
        data_dir=data,
        triton_url=triton.grpc_url if triton is not None else "127.0.0.1:1",
        workers=int(env.pop("SFUMATO_WORKERS", "1")),
        env={"SFUMATO_POLL_INTERVAL_S": "0.25", **env},
    )
    return cp, pg_name


def stop(cp: ControlPlane, pg_name: str | None) -> None:
    cp.stop()
    if pg_name:
        asyncio.run(_pg_drop(pg_name))


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (from /proc)."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[2]) == pgid:
                pids.append(int(entry.name))
    return pids


def measured(triton: Any, cp: ControlPlane | None, load: Any) -> dict[str, Any]:
    """Run ``load`` (a coroutine: warm-up, then the measured requests) and add where the CPU
    went: Triton's processes (server and backend stubs) and the control plane's, per request
    of the whole run (warm-up included)."""
    triton_pids = _group(triton.process.pid)
    before = (_cpu_s(triton_pids), _cpu_s([cp.process.pid]) if cp else 0.0)
    result = asyncio.run(load)
    requests = result["requests"] + result["concurrency"]  # the warm-up too
    result["triton_cpu_ms_per_request"] = (_cpu_s(triton_pids) - before[0]) / requests * 1000
    if cp is not None:
        result["control_plane_cpu_ms_per_request"] = (_cpu_s([cp.process.pid]) - before[1]) / requests * 1000
    return result


# --------------------------------------------------------------------------- reads


async def _ids(cp: ControlPlane, count: int) -> list[str]:
    async with httpx.AsyncClient(base_url=cp.url, headers=cp.headers, timeout=60) as http:
        ids = []
        for i in range(count):
            r = await http.post("/v1/generations", json={**REQUEST, "seed": i})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
    return ids


def reads(
    work: Path, db: str, *, rate: float, seconds: float, ramp: list[float], ramp_s: float
) -> dict[str, Any]:
    cp, pg_name = control_plane(work, db, None, "reads", SFUMATO_WORKERS="0")
    try:
        ids = asyncio.run(_ids(cp, 20))
        steady = asyncio.run(reads_at_rate(cp, ids, rate=rate, seconds=seconds))
        steps = []
        for r in ramp:
            step = asyncio.run(reads_at_rate(cp, ids, rate=r, seconds=ramp_s))
            steps.append(step)
            print(f"    {db} ramp {r:.0f}/s: {_brief(step)}", file=sys.stderr)
            if step["shed"] > 0.01 * step["requests"]:
                break
    finally:
        stop(cp, pg_name)
    onset = next((s["target_rate"] for s in steps if s["shed"] > 0.01 * s["requests"]), None)
    return {"steady": steady, "ramp": steps, "shedding_onset_rate": onset}


def _brief(row: dict[str, Any]) -> str:
    return (
        f"achieved {row['achieved_rate']:.0f}/s, p50 {row['p50_s'] * 1000:.1f} ms, "
        f"p99 {row['p99_s'] * 1000:.1f} ms, shed {row['shed']}, errors {row['errors']}"
    )


# --------------------------------------------------------------------------- submissions


async def _profile_submissions(db_url: str, data: Path, *, count: int) -> dict[str, Any]:
    """Submissions in process (the app through ASGI, no HTTP), under cProfile: the share of the
    time in the database driver, SQLAlchemy, pydantic, authentication, JSON, and the rest."""
    from sfumato.control_plane import accounts, migrate
    from sfumato.control_plane.app import create_app
    from sfumato.control_plane.settings import Settings

    await asyncio.to_thread(migrate.upgrade, db_url)
    settings = Settings(
        env="test",
        secret_key=secrets.token_urlsafe(48),
        database_url=db_url,
        data_dir=data,
        workers=0,
        triton_url="127.0.0.1:1",
        rate_limit="1000000/minute",
        submit_rate_limit="1000000/minute",
        max_queued_jobs_per_user=1000000,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with app.state.services.sessions() as session:
            user = await accounts.create_user(session=session, name="profiled")
            _, key = await accounts.create_key(session=session, user_id=user.id)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://p", timeout=60) as http:
            headers = {"Authorization": f"Bearer {key}"}
            queue = list(range(count))

            async def worker() -> None:
                while queue:
                    i = queue.pop()
                    r = await http.post("/v1/generations", json={**REQUEST, "seed": i}, headers=headers)
                    assert r.status_code == 202, r.text

            profile = cProfile.Profile()
            started = time.perf_counter()
            profile.enable()
            await asyncio.gather(*(worker() for _ in range(16)))
            profile.disable()
            elapsed = time.perf_counter() - started
    stats = pstats.Stats(profile)
    buckets = {
        "database driver (asyncpg / aiosqlite + sqlite3)": ("asyncpg", "aiosqlite", "sqlite3"),
        "SQLAlchemy (ORM, SQL compilation)": ("sqlalchemy",),
        "pydantic (validation, serialisation)": ("pydantic",),
        "password / key hashing": ("hashlib", "hmac", "argon2", "bcrypt", "security.py"),
        "JSON": ("json",),
        "rate limiter (limits)": ("limits",),
        "FastAPI / Starlette / httpx ASGI": ("fastapi", "starlette", "httpx", "anyio"),
        "sfumato control plane": ("control_plane",),
    }
    own: dict[str, float] = dict.fromkeys(buckets, 0.0)
    own["other (asyncio, ...)"] = 0.0
    total = 0.0
    for (filename, _line, _name), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        total += tottime
        for bucket, needles in buckets.items():
            if any(needle in filename for needle in needles):
                own[bucket] += tottime
                break
        else:
            own["other (asyncio, ...)"] += tottime
    top = sorted(
        (
            (tottime, f"{Path(fn).name}:{line} {name}")
            for (fn, line, name), (_cc, _nc, tottime, _ct, _c) in stats.stats.items()  # type: ignore[attr-defined]
        ),
        reverse=True,
    )[:12]
    return {
        "submissions": count,
        "in_process_per_s": count / elapsed,
        "share": {k: v / total for k, v in sorted(own.items(), key=lambda kv: -kv[1])},
        "top_functions_s": [(name, round(t, 4)) for t, name in top],
    }


def submission_run(work: Path, db: str, *, count: int) -> dict[str, Any]:
    cp, pg_name = control_plane(work, db, None, "submit", SFUMATO_WORKERS="0")
    try:
        result = asyncio.run(submissions(cp, count=count, concurrency=16))
        result.pop("ids")
    finally:
        stop(cp, pg_name)
    data = work / f"profile-{db}-{secrets.token_hex(3)}"
    data.mkdir(parents=True)
    pg_name = asyncio.run(_pg_create()) if db == "postgresql" else None
    url = pg_url(pg_name) if pg_name else f"sqlite+aiosqlite:///{data / 'db.sqlite'}"
    try:
        result["profile"] = asyncio.run(_profile_submissions(url, data, count=count))
    finally:
        if pg_name:
            asyncio.run(_pg_drop(pg_name))
    return result


# --------------------------------------------------------------------------- main


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows = [("gRPC", results["grpc_mean_images_per_s"])] + [
        (label, row["images_per_s"]) for label, row in results["rest"].items()
    ]
    left.barh([r[0] for r in rows], [r[1] for r in rows], color=["#888"] + ["#3a7"] * (len(rows) - 1))
    left.set_xlabel(f"images/s at concurrency {results['concurrency']}")
    left.invert_yaxis()
    for db, r in results["reads"].items():
        ramp = r["ramp"]
        right.plot(
            [s["target_rate"] for s in ramp], [s["p99_s"] * 1000 for s in ramp], marker="o", label=f"{db} p99"
        )
        right.plot(
            [s["target_rate"] for s in ramp], [s["p50_s"] * 1000 for s in ramp], marker=".", label=f"{db} p50"
        )
    right.set_xlabel("GET /v1/generations/{id} offered, req/s")
    right.set_ylabel("latency, ms")
    right.set_yscale("log")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96, help="requests per throughput run")
    parser.add_argument("--latency-requests", type=int, default=30, help="REST/gRPC pairs at concurrency 1")
    parser.add_argument("--rate", type=float, default=200.0, help="GET requests per second (open loop)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of the open-loop GET run")
    parser.add_argument("--ramp", default="100,200,300,400,600,800", help="GET rates to find shedding")
    parser.add_argument("--ramp-seconds", type=float, default=10.0)
    parser.add_argument("--submissions", type=int, default=500)
    parser.add_argument("--dbs", default="sqlite,postgresql")
    parser.add_argument(
        "--quick", action="store_true", help="short: 32 requests, 10 s reads, 200 submissions"
    )
    parser.add_argument("--only", choices=["throughput", "latency", "reads", "submissions"], action="append")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.latency_requests, args.duration = 32, 12, 10.0
        args.ramp_seconds, args.submissions = 4.0, 200
    only = set(args.only or ["throughput", "latency", "reads", "submissions"])
    dbs = args.dbs.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    work = ROOT / "var" / "bench-events"
    work.mkdir(parents=True, exist_ok=True)
    c, n = args.concurrency, args.requests
    results: dict[str, Any] = {"concurrency": c, "requests": n, "rest": {}, "latency": {}, "reads": {}}

    if only & {"throughput", "latency"}:
        triton = start_triton(export_repo(ROOT / "var" / "bench" / "batched", batching=True), work / "triton")
        try:
            if "throughput" in only:
                print(f"throughput at concurrency {c} ...", file=sys.stderr)
                grpc_runs = [
                    measured(triton, None, grpc_load(triton.grpc_url, count=n, concurrency=c, seed0=0))
                ]
                print(f"  gRPC: {grpc_runs[0]}", file=sys.stderr)
                variants = [(f"REST {db}, streaming worker", db, {}) for db in dbs]
                variants.append(
                    (f"REST {dbs[0]}, plain pipeline", dbs[0], {"SFUMATO_WORKER_STREAMING": "false"})
                )
                # One user alone is held to 12 of the 16 slots by the per-user share (0.75).
                variants.append((f"REST {dbs[0]}, no per-user cap", dbs[0], {"SFUMATO_MAX_USER_SHARE": "1"}))
                for label, db, env in variants:
                    cp, pg_name = control_plane(work, db, triton, "rest", **env)
                    try:
                        results["rest"][label] = measured(
                            triton, cp, rest_load(cp, count=n, concurrency=c, seed0=0)
                        )
                    finally:
                        stop(cp, pg_name)
                    print(f"  {label}: {results['rest'][label]}", file=sys.stderr)
                grpc_runs.append(
                    measured(triton, None, grpc_load(triton.grpc_url, count=n, concurrency=c, seed0=0))
                )
                print(f"  gRPC again: {grpc_runs[1]}", file=sys.stderr)
                results["grpc"] = grpc_runs
                results["grpc_mean_images_per_s"] = sum(g["images_per_s"] for g in grpc_runs) / len(grpc_runs)
            if "latency" in only:
                cases = [(db, db, {}) for db in dbs]
                cases.append((f"{dbs[0]}, plain pipeline", dbs[0], {"SFUMATO_WORKER_STREAMING": "false"}))
                for label, db, env in cases:
                    print(f"latency at concurrency 1, {label} ...", file=sys.stderr)
                    cp, pg_name = control_plane(work, db, triton, "latency", **env)
                    try:
                        results["latency"][label] = asyncio.run(
                            rest_vs_grpc(cp, triton.grpc_url, count=args.latency_requests)
                        )
                    finally:
                        stop(cp, pg_name)
                    print(f"  {results['latency'][label]}", file=sys.stderr)
        finally:
            triton.stop()

    if "reads" in only:
        ramp = [float(r) for r in args.ramp.split(",")]
        for db in dbs:
            print(f"reads at {args.rate:.0f}/s for {args.duration:.0f} s, {db} ...", file=sys.stderr)
            results["reads"][db] = reads(
                work, db, rate=args.rate, seconds=args.duration, ramp=ramp, ramp_s=args.ramp_seconds
            )
            print(f"  {_brief(results['reads'][db]['steady'])}", file=sys.stderr)

    if "submissions" in only:
        results["submissions"] = {}
        for db in dbs:
            print(f"submissions, {db} ...", file=sys.stderr)
            results["submissions"][db] = submission_run(work, db, count=args.submissions)
            print(f"  {results['submissions'][db]['per_s']:.0f}/s", file=sys.stderr)

    report(results)
    (args.out / "events.json").write_text(json.dumps(results, indent=2) + "\n")
    if results["rest"] and results["reads"]:
        plot(results, args.out / "events.png")
    print(f"\nsaved {args.out / 'events.json'}")
    return 0


def report(results: dict[str, Any]) -> None:
    if results["rest"]:
        g = results["grpc_mean_images_per_s"]
        n, c = results["requests"], results["concurrency"]
        print(f"\nThroughput, {n} requests (25 steps, guidance 5) at concurrency {c}")
        print(f"{'path':<40} {'images/s':>9} {'p50 s':>7} {'p95 s':>7} {'vs gRPC':>8}  CPU ms/request")
        for i, row in enumerate(results["grpc"]):
            label = f"direct gRPC pipeline, run {i + 1}"
            figures = f"{row['images_per_s']:>9.2f} {row['p50_s']:>7.3f} {row['p95_s']:>7.3f}"
            print(f"{label:<40} {figures} {'':>8}  Triton {row['triton_cpu_ms_per_request']:.0f}")
        for label, row in results["rest"].items():
            print(
                f"{label:<40} {row['images_per_s']:>9.2f} {row['p50_s']:>7.3f} {row['p95_s']:>7.3f} "
                f"{row['images_per_s'] / g:>7.2f}x  Triton {row['triton_cpu_ms_per_request']:.0f}, "
                f"control plane {row['control_plane_cpu_ms_per_request']:.0f}"
            )
    if results["latency"]:
        print("\nLatency at concurrency 1 (REST Prefer: wait and gRPC interleaved)")
        print(f"{'database':<24} {'REST p50 ms':>12} {'gRPC p50 ms':>12} {'+ms p50':>8} {'+ms p95':>8}")
        for db, row in results["latency"].items():
            print(
                f"{db:<24} {row['rest_p50_s'] * 1000:>12.1f} {row['grpc_p50_s'] * 1000:>12.1f} "
                f"{row['overhead_p50_s'] * 1000:>8.1f} {row['overhead_p95_s'] * 1000:>8.1f}"
            )
    if results["reads"]:
        print("\nGET /v1/generations/{id}, open loop")
        for db, r in results["reads"].items():
            s = r["steady"]
            print(
                f"{db:<12} {s['target_rate']:.0f}/s for {s['requests'] / s['target_rate']:.0f} s: {_brief(s)}"
            )
            onset = r["shedding_onset_rate"] or f"none up to {r['ramp'][-1]['target_rate']:.0f}"
            print(f"{'':<12} shedding starts at {onset} req/s")
    for db, row in results.get("submissions", {}).items():
        p = row["profile"]
        print(
            f"\nSubmissions, {db}: {row['per_s']:.0f}/s over HTTP at concurrency 16 "
            f"({p['in_process_per_s']:.0f}/s in process, profiled)"
        )
        for bucket, share in p["share"].items():
            print(f"  {share * 100:5.1f}%  {bucket}")


if __name__ == "__main__":
    sys.exit(main())
