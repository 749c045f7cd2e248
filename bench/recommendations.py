"""Recommendation benchmarks: serving latency of the precomputed rows, and the recommender at scale.

Run with ``.venv/bin/python bench/recommendations.py`` (``--quick`` for a short run; the full scale
run takes minutes: run it with ``nice``). Printed as tables, saved as
``bench/results/recommendations.json`` and ``bench/results/recommendations.png``.

* **Serving**: ``sfumato serve`` (uvicorn, a real process) on SQLite and on PostgreSQL, with a
  community written straight into its database (``--serve-users`` users, ``--serve-items`` items,
  ``--serve-interactions`` interactions), refitted once through ``POST
  /v1/recommendations/generate`` (its report: fit and row-writing time); then
  ``GET /v1/users/{id}/recommendations?limit=10`` open-loop at ``--rate`` requests/s (each
  request leaves on schedule, whatever came back) for random users with fresh rows: p50 / p99.
  Target: p99 <= 20 ms at 100 req/s.
* **Scale**: the algorithm alone (:mod:`sfumato.control_plane.recommender.hybrid`) on synthetic
  arrays with ``--scale-users`` users and ``--scale-items`` items, at each of
  ``--scale-interactions`` (default 0.5M, 1M, 5M), every size in a fresh subprocess: ALS fit
  time, time to rank every user's top 50 (the refit's row refresh, without the database write),
  and the process's peak resident memory. Embeddings are random clustered 64-d vectors (the
  text encoder's width), interactions Zipf-distributed over items.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))


# --------------------------------------------------------------------------- scale


def scale_one(
    users: int, items: int, interactions: int, seed: int = 0, refresh_users: int | None = None
) -> dict[str, Any]:
    """One size, in this process: fit, rank every user (or the first ``refresh_users``, the time
    scaled to all of them), peak RSS."""
    import scipy.sparse as sp  # noqa: F401

    from sfumato.control_plane.recommender import hybrid

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    item_p = 1.0 / (1.0 + np.arange(items)) ** 0.9
    item_p /= item_p.sum()
    u = rng.integers(users, size=interactions)
    i = rng.choice(items, size=interactions, p=item_p)
    kinds = rng.choice(
        np.array([1.0, 4.0, 3.0, -4.0], dtype=np.float32), size=interactions, p=[0.6, 0.25, 0.1, 0.05]
    )
    times = time.time() - rng.uniform(0, 30 * 86400, size=interactions)
    centres = rng.normal(size=(200, 64)).astype(np.float32)
    embeddings = centres[rng.integers(200, size=items)] + 0.3 * rng.normal(size=(items, 64)).astype(
        np.float32
    )
    generated_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    matrix = hybrid.user_item_matrix(users, items, u, i, kinds)
    popularity = hybrid.decayed_popularity(items, i, kinds, times, now=time.time(), half_life_days=7)
    matrix_s = time.perf_counter() - t0
    cpu0 = time.process_time()
    model = hybrid.fit(matrix, embeddings, popularity)
    fit_s = model.fit_s
    fit_cpu_s = time.process_time() - cpu0

    t0, cpu0 = time.perf_counter(), time.process_time()
    history = np.diff(matrix.indptr)
    batch = 256
    ranked_users = min(users, refresh_users or users)
    for start in range(0, ranked_users, batch):
        rows = np.arange(start, min(start + batch, ranked_users))
        sub = matrix[rows]
        taste = hybrid.tastes(model, sub)
        seen = (abs(sub) > 0).astype(np.float32)
        hybrid.rank(model, model.user_factors[rows], taste, history[rows], seen, k=50)
    refresh_s = (time.perf_counter() - t0) * users / ranked_users
    refresh_cpu_s = (time.process_time() - cpu0) * users / ranked_users
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    return {
        "users": users,
        "items": items,
        "interactions": interactions,
        "nonzero_cells": int(matrix.nnz),
        "generate_s": generated_s,
        "matrix_s": matrix_s,
        "fit_s": fit_s,
        "fit_cpu_s": fit_cpu_s,  # all threads
        "refresh_all_cpu_s": refresh_cpu_s,
        "load_average_1m": os.getloadavg()[0],
        "refresh_all_s": refresh_s,
        "refresh_measured_users": ranked_users,
        "refresh_per_1k_users_s": refresh_s / users * 1000,
        "peak_rss_mib": peak,
        "factors": model.params.factors,
        "iterations": model.params.iterations,
    }


def scale_run(users: int, items: int, sizes: list[int], *, sample: int) -> list[dict[str, Any]]:
    """Each size in a fresh process; every user ranked at the largest size, ``sample`` users at
    the others (rank time does not depend on the interaction count but for the seen-item masks)."""
    out = []
    for n in sizes:
        refresh = None if n == max(sizes) else sample
        code = (
            "import json, sys; sys.path.insert(0, 'bench'); import recommendations as r; "
            f"print(json.dumps(r.scale_one({users}, {items}, {n}, refresh_users={refresh})))"
        )
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, text=True
        )
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"  {n:>9,} interactions: fit {row['fit_s']:.1f} s, rank all users {row['refresh_all_s']:.1f} s "
            f"({row['refresh_measured_users']:,} measured), "
            f"peak {row['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
        out.append(row)
    return out


# --------------------------------------------------------------------------- serving


async def seed_database(url: str, *, users: int, items: int, interactions: int, seed: int = 0) -> list[str]:
    """Users, public content and interactions written straight into the database; the user ids."""
    from sqlalchemy import insert

    from sfumato.control_plane.db import create_engine
    from sfumato.control_plane.models import ContentItem, Interaction, User, new_id, utcnow

    rng = random.Random(seed)
    engine = create_engine(url)
    user_ids = [new_id() for _ in range(users)]
    item_ids = [new_id() for _ in range(items)]
    now = utcnow()
    vectors = np.random.default_rng(seed).normal(size=(items, 64)).astype(np.float32)
    async with engine.begin() as conn:
        await conn.execute(
            insert(User),
            [
                {"id": uid, "name": f"bench-{uid[:12]}", "role": "member", "created_at": now}
                for uid in user_ids
            ],
        )
        await conn.execute(
            insert(ContentItem),
            [
                {
                    "id": iid,
                    "creator_id": user_ids[k % users],
                    "title": f"item {k}",
                    "prompt": f"item {k}",
                    "tags": [],
                    "tag_index": "|",
                    "content_type": "image",
                    "visibility": "public",
                    "storage_key": f"content/{iid}.png",
                    "sha256": "0" * 64,
                    "width": 32,
                    "height": 32,
                    "embedding": vectors[k].tobytes(),
                    "created_at": now,
                    "updated_at": now,
                }
                for k, iid in enumerate(item_ids)
            ],
        )
        seen: set[tuple[int, int]] = set()
        rows = []
        weights = [1.0 / (1 + k) ** 0.8 for k in range(items)]
        picks = rng.choices(range(items), weights=weights, k=interactions)
        for n in range(interactions):
            u, i = rng.randrange(users), picks[n]
            kind = rng.choice(["view", "view", "like", "download"])
            slot = "reaction" if kind == "like" else None
            if slot and (u, i) in seen:
                kind, slot = "view", None
            if slot:
                seen.add((u, i))
            rows.append(
                {
                    "id": new_id(),
                    "user_id": user_ids[u],
                    "content_id": item_ids[i],
                    "type": kind,
                    "slot": slot,
                    "created_at": now,
                }
            )
        for start in range(0, len(rows), 5000):
            await conn.execute(insert(Interaction), rows[start : start + 5000])
    await engine.dispose()
    return user_ids


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def latency(
    url: str, key: str, paths: list[str], *, rate: float | None, seconds: float, pid: int | None = None
) -> dict[str, Any]:
    """``GET`` each of ``paths`` (cycled): open-loop at ``rate`` requests/s (each request leaves on
    schedule, whatever came back), or one at a time when ``rate`` is ``None``."""
    import aiohttp

    from control_plane import pct  # bench/control_plane.py

    latencies: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, connector=aiohttp.TCPConnector(limit=1024)
    ) as http:

        async def one(path: str, record: bool = True) -> None:
            nonlocal errors
            t0 = time.perf_counter()
            async with http.get(path) as response:
                await response.read()
                status = response.status
            if not record:
                return
            if status == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

        for path in paths[:20]:  # warm the connection pool
            await one(path, record=False)
        cpu0 = cpu_seconds(pid) if pid else 0.0
        rng = random.Random(1)
        start = time.perf_counter()
        n = int((rate or 100.0) * seconds)
        if rate is None:
            for _ in range(n):
                await one(rng.choice(paths))
        else:
            tasks = []
            for i in range(n):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(rng.choice(paths))))
            await asyncio.gather(*tasks)
        sent = time.perf_counter() - start
        cpu = cpu_seconds(pid) - cpu0 if pid else float("nan")
    return {
        "server_cpu_ms_per_request": cpu / n * 1000,
        "rate": rate,
        "achieved_rate": n / sent,
        "requests": n,
        "answered": len(latencies),
        "errors": errors,
        "p50_ms": pct(latencies, 50) * 1000,
        "p99_ms": pct(latencies, 99) * 1000,
        "max_ms": max(latencies, default=float("nan")) * 1000,
    }


def serving_run(database: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from control_plane import ControlPlane, _pg_create, _pg_drop, pg_url  # bench/control_plane.py

    work.mkdir(parents=True, exist_ok=True)
    pg_name = None
    if database == "postgresql":
        pg_name = asyncio.run(_pg_create())
        url = pg_url(pg_name)
    else:
        url = f"sqlite+aiosqlite:///{work / 'sfumato.db'}"
    cp = ControlPlane(
        database_url=url,
        data_dir=work,
        triton_url="127.0.0.1:1",
        workers=0,
        env={"SFUMATO_RECOMMEND_REFIT_INTERVAL_S": "0", "SFUMATO_MAX_REQUESTS_IN_FLIGHT": "100000"},
    )
    try:
        admin = subprocess.run(
            [
                str(Path(sys.executable).parent / "sfumato"),
                "admin",
                "create-key",
                "--user",
                "bench-admin",
                "--role",
                "admin",
            ],
            env=cp.env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        t0 = time.perf_counter()
        user_ids = asyncio.run(
            seed_database(
                url, users=args.serve_users, items=args.serve_items, interactions=args.serve_interactions
            )
        )
        seed_s = time.perf_counter() - t0
        r = httpx.post(
            f"{cp.url}/v1/recommendations/generate",
            headers={"Authorization": f"Bearer {admin}"},
            timeout=3600,
        )
        r.raise_for_status()
        refit = r.json()
        pid = cp.process.pid
        recs = [f"/v1/users/{uid}/recommendations?limit=10" for uid in user_ids]
        me = ["/v1/users/me"]
        runs = {}
        # Side by side: the recommendations route, and the cheapest authenticated read (the
        # baseline: what any route costs here), one request at a time, then open-loop.
        for name, paths in (("recommendations", recs), ("baseline /v1/users/me", me)):
            runs[name] = {
                "sequential": asyncio.run(latency(cp.url, admin, paths, rate=None, seconds=2.0, pid=pid)),
                "open_loop": asyncio.run(
                    latency(cp.url, admin, paths, rate=args.rate, seconds=args.seconds, pid=pid)
                ),
            }
    finally:
        cp.stop()
        if pg_name:
            asyncio.run(_pg_drop(pg_name))
    load = os.getloadavg()[0]
    return {"database": database, "seed_s": seed_s, "refit": refit, "runs": runs, "load_average_1m": load}


# --------------------------------------------------------------------------- report


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, serving = report["scale"], report["serving"]
    panels = [name for name, rows in (("scale", scale), ("serving", serving)) if rows]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "scale":
            x = [row["interactions"] / 1e6 for row in scale]
            ax.plot(x, [row["fit_s"] for row in scale], "o-", label="ALS fit (s, wall)")
            ax.plot(x, [row["refresh_all_s"] for row in scale], "s-", label="rank every user (s, wall)")
            ax.set_yscale("log")
            ax.set_xlabel("interactions (millions)")
            ax.set_ylabel("seconds")
            memory = ax.twinx()
            memory.plot(
                x, [row["peak_rss_mib"] for row in scale], "^--", color="green", label="peak RSS (MiB)"
            )
            memory.set_ylabel("MiB")
            memory.set_ylim(bottom=0)
            lines = ax.get_legend_handles_labels()
            more = memory.get_legend_handles_labels()
            ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="center right")
            ax.set_title(f"{scale[0]['users']:,} users x {scale[0]['items']:,} items")
        else:
            labels, p50, p99 = [], [], []
            for row in serving:
                for name, run in row["runs"].items():
                    labels.append(f"{row['database']}\n{name.split()[0]}")
                    p50.append(run["open_loop"]["p50_ms"])
                    p99.append(run["open_loop"]["p99_ms"])
            x = np.arange(len(labels))
            ax.bar(x - 0.2, p50, 0.4, label="p50")
            ax.bar(x + 0.2, p99, 0.4, label="p99")
            ax.axhline(20, color="red", linestyle="--", label="target p99 20 ms")
            ax.set_xticks(x, labels, fontsize=8)
            ax.set_ylabel("ms")
            ax.set_yscale("log")
            ax.set_title(f"GET at {report.get('rate', 0):.0f} req/s open-loop")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, short runs")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--serve-users", type=int, default=2000)
    parser.add_argument("--serve-items", type=int, default=2000)
    parser.add_argument("--serve-interactions", type=int, default=50_000)
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--scale-users", type=int, default=100_000)
    parser.add_argument("--scale-items", type=int, default=50_000)
    parser.add_argument("--scale-interactions", type=int, nargs="*", default=[500_000, 1_000_000, 5_000_000])
    parser.add_argument(
        "--scale-refresh-sample",
        type=int,
        default=20_000,
        help="users ranked at the smaller sizes (scaled up)",
    )
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "recommendations.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 5.0
        args.serve_users, args.serve_items, args.serve_interactions = 300, 300, 5000
        args.scale_users, args.scale_items = 10_000, 5_000
        args.scale_interactions = [50_000, 100_000, 500_000]

    import tempfile

    report: dict[str, Any] = {
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "rate": args.rate,
        "serving": [],
        "scale": [],
    }
    if not args.skip_serving:
        print(f"serving: GET /v1/users/{{id}}/recommendations?limit=10 open-loop at {args.rate:.0f} req/s")
        with tempfile.TemporaryDirectory(prefix="sfumato-bench-recs-") as tmp:
            for database in args.databases:
                row = serving_run(database, Path(tmp) / database, args)
                report["serving"].append(row)
                print(
                    f"  {database}: refit: load {row['refit']['load_s']:.2f} s,"
                    f" fit {row['refit']['fit_s']:.2f} s"
                    f" + rows {row['refit']['refresh_s']:.2f} s; "
                    f"load average {row['load_average_1m']:.1f} on {os.cpu_count()} cores",
                    flush=True,
                )
                for name, run in row["runs"].items():
                    for mode, r in run.items():
                        print(
                            f"    {name:<24}{mode:<11}{r['achieved_rate']:>7.0f} req/s"
                            f"  p50 {r['p50_ms']:7.1f} ms"
                            f"  p99 {r['p99_ms']:7.1f} ms"
                            f"  server CPU {r['server_cpu_ms_per_request']:.1f} ms/req"
                            f"  errors {r['errors']}",
                            flush=True,
                        )
    if not args.skip_scale:
        print(
            f"scale: {args.scale_users:,} users x {args.scale_items:,} items "
            "(algorithm alone, one process per size)"
        )
        report["scale"] = scale_run(
            args.scale_users, args.scale_items, args.scale_interactions, sample=args.scale_refresh_sample
        )
        if len(report["scale"]) >= 2:
            a, b = report["scale"][0], report["scale"][-1]
            factor = b["interactions"] / a["interactions"]
            report["growth"] = {
                "interactions_x": factor,
                "fit_x": b["fit_s"] / a["fit_s"],
                "refresh_x": b["refresh_all_s"] / a["refresh_all_s"],
                "peak_rss_x": b["peak_rss_mib"] / a["peak_rss_mib"],
            }
            g = report["growth"]
            print(
                f"  {factor:.0f}x the interactions: fit {g['fit_x']:.2f}x, rank-all {g['refresh_x']:.2f}x, "
                f"peak memory {g['peak_rss_x']:.2f}x"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(f"saved {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
