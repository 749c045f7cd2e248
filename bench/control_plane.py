"""Control-plane benchmarks: what the REST layer costs, and how fast jobs go in and out.

Run with ``make bench`` (or ``.venv/bin/python bench/control_plane.py``). Real processes: a
``tritonserver`` and ``sfumato serve`` (uvicorn) over HTTP on loopback. Printed as a table and
saved as ``bench/results/control_plane.json``.

* REST ``Prefer: wait`` latency vs a direct gRPC call to Triton for the same request (p50, p95):
  the control plane's overhead (auth, job record, worker claim, image store, PNG).
* Job submissions per second (no workers, so it is the write path alone) on SQLite and PostgreSQL.
* ``GET /v1/generations/{id}`` p50 / p99 under a fixed request rate, on both databases.
* Large uploads: ``/healthz`` latency while 4096² PNGs are submitted as ``image`` (1, then 4 at
  once): the decode runs on worker threads, so the event loop keeps answering.
* Load shedding: the same reads open-loop at rising rates (``--shed-rates``), with the in-flight
  cap (``SFUMATO_MAX_REQUESTS_IN_FLIGHT``) at its default and, side by side, with it out of the
  way: answered / shed (503) / failed per rate, p50 / p99 of the answered ones, and the rate at
  which shedding starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PG_ADMIN = os.environ.get("SFUMATO_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REQUEST = {"prompt": "a red circle on a white background", "steps": 25, "guidance_scale": 5.0}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


class ControlPlane:
    """``sfumato serve`` in a subprocess on a free port, with one API key."""

    def __init__(
        self,
        *,
        database_url: str,
        data_dir: Path,
        triton_url: str,
        workers: int,
        env: dict[str, str] | None = None,
    ) -> None:
        from sfumato.triton_server import free_port

        self.port = free_port()
        self.env = {
            **os.environ,
            "SFUMATO_ENV": "test",
            "SFUMATO_SECRET_KEY": secrets.token_urlsafe(48),
            "SFUMATO_DATABASE_URL": database_url,
            "SFUMATO_DATA_DIR": str(data_dir),
            "SFUMATO_TRITON_URL": triton_url,
            "SFUMATO_WORKERS": str(workers),
            "SFUMATO_POLL_INTERVAL_S": "0.02",
            "SFUMATO_RATE_LIMIT": "1000000/minute",
            "SFUMATO_SUBMIT_RATE_LIMIT": "1000000/minute",
            "SFUMATO_JOB_READ_RATE_LIMIT": "1000000/minute",
            "SFUMATO_MAX_QUEUED_JOBS_PER_USER": "1000000",
            **(env or {}),
        }
        sfumato = str(Path(sys.executable).parent / "sfumato")
        subprocess.run([sfumato, "db", "upgrade"], env=self.env, check=True, capture_output=True)
        self.key = subprocess.run(
            [sfumato, "admin", "create-key", "--user", "bench"],
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        self.log = (data_dir / "serve.log").open("wb")
        self.process = subprocess.Popen(
            [sfumato, "serve", "--port", str(self.port), "--no-migrate", "--log-level", "warning"],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"sfumato serve did not start; see {data_dir / 'serve.log'}")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


async def rest_vs_grpc(cp: ControlPlane, triton_url: str, *, count: int) -> dict[str, Any]:
    import tritonclient.grpc.aio as aio

    from sfumato.clients.triton_grpc import pipeline_inputs

    rest, grpc = [], []
    client = aio.InferenceServerClient(triton_url)
    async with httpx.AsyncClient(base_url=cp.url, headers=cp.headers, timeout=120) as http:
        for i in range(count + 2):  # the first two warm both paths up
            t0 = time.perf_counter()
            response = await http.post(
                "/v1/generations", json={**REQUEST, "seed": i}, headers={"Prefer": "wait=60"}
            )
            rest_s = time.perf_counter() - t0
            assert response.status_code == 200 and response.json()["status"] == "succeeded", response.text
            png = await http.get(response.json()["images"][0]["url"])
            assert png.status_code == 200
            t0 = time.perf_counter()
            await client.infer("pipeline", pipeline_inputs(aio, seed=i, **REQUEST))
            grpc_s = time.perf_counter() - t0
            if i >= 2:
                rest.append(rest_s)
                grpc.append(grpc_s)
    await client.close()
    return {
        "requests": count,
        "rest_p50_s": pct(rest, 50),
        "rest_p95_s": pct(rest, 95),
        "grpc_p50_s": pct(grpc, 50),
        "grpc_p95_s": pct(grpc, 95),
        "overhead_p50_s": pct(rest, 50) - pct(grpc, 50),
        "overhead_p95_s": pct(rest, 95) - pct(grpc, 95),
    }


async def submissions(cp: ControlPlane, *, count: int, concurrency: int) -> dict[str, Any]:
    queue = list(range(count))
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=cp.url, headers=cp.headers, timeout=60) as http:
        await http.post("/v1/generations", json=REQUEST)

        async def worker() -> None:
            while queue:
                i = queue.pop()
                response = await http.post("/v1/generations", json={**REQUEST, "seed": i})
                assert response.status_code == 202, response.text
                ids.append(response.json()["id"])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"submissions": count, "concurrency": concurrency, "per_s": count / elapsed, "ids": ids}


async def reads_at_rate(cp: ControlPlane, ids: list[str], *, rate: float, seconds: float) -> dict[str, Any]:
    """Open-loop ``GET /v1/generations/{id}``: request i leaves at start + i / rate, whatever came
    back. Latencies of the answered (200) reads; shed (503 + Retry-After) and failed (anything
    else, a 60 s timeout included) counted apart. aiohttp: httpx's client, with a pool larger
    than the server's in-flight cap, spent more CPU than the server it measured."""
    import aiohttp

    latencies: list[float] = []
    shed_latencies: list[float] = []
    errors = shed = 0
    # More connections than the server's in-flight cap, so that the server, not the client's
    # pool, decides what waits.
    connector = aiohttp.TCPConnector(limit=2048)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        base_url=cp.url, headers=cp.headers, connector=connector, timeout=timeout
    ) as http:

        async def one(job_id: str) -> None:
            nonlocal errors, shed
            t0 = time.perf_counter()
            try:
                async with http.get(f"/v1/generations/{job_id}") as response:
                    await response.read()
                    status, retry_after = response.status, "Retry-After" in response.headers
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
                return
            elapsed = time.perf_counter() - t0
            if status == 200:
                latencies.append(elapsed)
            elif status == 503 and retry_after:
                shed += 1
                shed_latencies.append(elapsed)
            else:
                errors += 1

        tasks = []
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(ids[i % len(ids)])))
        sent_s = time.perf_counter() - start
        await asyncio.gather(*tasks)
    achieved = n / sent_s if sent_s > 0 else float("nan")
    return {
        "target_rate": rate,
        "achieved_rate": achieved,
        "requests": n,
        "answered": len(latencies),
        "shed": shed,
        "errors": errors,
        "p50_s": pct(latencies, 50),
        "p99_s": pct(latencies, 99),
        "max_s": max(latencies, default=float("nan")),
        "shed_p99_s": pct(shed_latencies, 99),
    }


async def _pg_create() -> str:
    import asyncpg

    name = f"sfumato_bench_{secrets.token_hex(4)}"
    connection = await asyncpg.connect(PG_ADMIN)
    await connection.execute(f"CREATE DATABASE {name}")
    await connection.close()
    return name


async def _pg_drop(name: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(PG_ADMIN)
    await connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    await connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30, help="REST-vs-gRPC pairs")
    parser.add_argument("--submissions", type=int, default=500)
    parser.add_argument("--rate", type=float, default=100.0, help="GET requests per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--shed-rates", default="100,200,400,800", help="GET rates (requests/s) of the load-shedding ramp"
    )
    parser.add_argument("--shed-seconds", type=float, default=20.0, help="seconds at each rate of the ramp")
    parser.add_argument("--only-shedding", action="store_true", help="run the load-shedding ramp alone")
    parser.add_argument("--only-uploads", action="store_true", help="run the large-upload measurement alone")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    shed_rates = [float(r) for r in args.shed_rates.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    work = ROOT / "var" / "bench-control-plane"
    work.mkdir(parents=True, exist_ok=True)

    results: dict[str, Any] = {"databases": {}}
    if not (args.only_shedding or args.only_uploads):
        results.update(full_run(args, work))
    if not args.only_shedding:
        results["uploads"] = uploads_run(work, side=4096)
        print_uploads(results["uploads"])
    if args.only_uploads:
        (args.out / "control_plane_uploads.json").write_text(json.dumps(results, indent=2) + "\n")
        return 0
    results["shedding"] = shedding_run(work, rates=shed_rates, seconds=args.shed_seconds)
    print_shedding(results["shedding"])
    name = "control_plane_shedding" if args.only_shedding else "control_plane"
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_shedding(results["shedding"], args.out / f"{name}.png")
    print(f"\nsaved {args.out / name}.json and .png")
    return 0


def big_png(side: int) -> str:
    """A ``side``² RGB PNG with smooth gradients (small file, every pixel to decode), base64."""
    import base64
    import io

    from PIL import Image

    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[::-1][None, :]), axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def health_during_uploads(cp: ControlPlane, image: str, *, parallel: int) -> dict[str, Any]:
    """``/healthz`` every 10 ms while ``parallel`` uploads of ``image`` are handled (0: the
    baseline, the machine's own noise)."""
    async with httpx.AsyncClient(base_url=cp.url, headers=cp.headers, timeout=300) as http:
        pings: list[float] = []
        done = asyncio.Event()

        async def ping() -> None:
            while not done.is_set():
                t0 = time.perf_counter()
                await http.get("/healthz")
                pings.append(time.perf_counter() - t0)
                await asyncio.sleep(0.01)

        pinger = asyncio.create_task(ping())
        await asyncio.sleep(0.3)
        before = len(pings)
        t0 = time.perf_counter()
        answers = await asyncio.gather(
            *(
                http.post("/v1/generations", json={"prompt": "a red circle", "image": image})
                for _ in range(parallel)
            )
        )
        if not parallel:  # the baseline: the same pings, no upload
            await asyncio.sleep(1.5)
        upload_s = time.perf_counter() - t0
        done.set()
        await pinger
    assert all(r.status_code == 202 for r in answers), [r.text[:200] for r in answers]
    during = pings[before:]
    return {
        "parallel": parallel,
        "upload_s": upload_s,
        "healthz_during": len(during),
        "healthz_p50_s": pct(during, 50),
        "healthz_max_s": max(during, default=float("nan")),
    }


def uploads_run(work: Path, *, side: int) -> list[dict[str, Any]]:
    data = work / f"uploads-{secrets.token_hex(3)}"
    data.mkdir()
    cp = ControlPlane(
        database_url=f"sqlite+aiosqlite:///{data / 'db.sqlite'}",
        data_dir=data,
        triton_url="127.0.0.1:1",
        workers=0,
    )
    try:
        image = big_png(side)
        return [asyncio.run(health_during_uploads(cp, image, parallel=n)) for n in (0, 1, 4, 0, 1, 4)]
    finally:
        cp.stop()


def print_uploads(uploads: list[dict[str, Any]]) -> None:
    print("\n/healthz while 4096x4096 PNGs are uploaded (decoded on worker threads)")
    print(f"{'uploads':>8} {'upload s':>9} {'pings':>6} {'healthz p50 ms':>15} {'healthz max ms':>15}")
    for u in uploads:
        print(
            f"{u['parallel']:>8} {u['upload_s']:>9.2f} {u['healthz_during']:>6} "
            f"{u['healthz_p50_s'] * 1000:>15.1f} {u['healthz_max_s'] * 1000:>15.1f}"
        )


def pg_url(name: str) -> str:
    return PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://") + f"/{name}"


CAPS = {"default cap (64)": "64", "no cap": "1000000"}


def shedding_run(work: Path, *, rates: list[float], seconds: float) -> dict[str, Any]:
    """The ramp on each database against two servers, one with the in-flight cap at its default
    and one with it out of the way, interleaved rate by rate (a shared machine's load drifts)."""
    out: dict[str, Any] = {}
    for label in ("sqlite", "postgresql"):
        pg_names: list[str] = []
        servers: dict[str, ControlPlane] = {}
        try:
            for cap_label, cap in CAPS.items():
                data = work / f"{label}-shed-{cap}-{secrets.token_hex(3)}"
                data.mkdir()
                if label == "postgresql":
                    pg_names.append(asyncio.run(_pg_create()))
                url = (
                    pg_url(pg_names[-1])
                    if label == "postgresql"
                    else f"sqlite+aiosqlite:///{data / 'db.sqlite'}"
                )
                servers[cap_label] = ControlPlane(
                    database_url=url,
                    data_dir=data,
                    triton_url="127.0.0.1:1",
                    workers=0,
                    env={"SFUMATO_MAX_REQUESTS_IN_FLIGHT": cap},
                )
            ids = {
                k: asyncio.run(submissions(cp, count=50, concurrency=4))["ids"] for k, cp in servers.items()
            }
            steps: dict[str, list[dict[str, Any]]] = {k: [] for k in servers}
            for rate in rates:
                for cap_label, cp in servers.items():
                    print(f"{label}: {cap_label}, GET at {rate}/s ...", file=sys.stderr)
                    steps[cap_label].append(
                        asyncio.run(reads_at_rate(cp, ids[cap_label], rate=rate, seconds=seconds))
                    )
        finally:
            for cp in servers.values():
                cp.stop()
            for name in pg_names:
                asyncio.run(_pg_drop(name))
        out[label] = {
            cap_label: {
                "cap": CAPS[cap_label],
                "steps": curve,
                "sheds_from_rate": next(
                    (st["target_rate"] for st in curve if st["shed"] > 0.01 * st["requests"]), None
                ),
            }
            for cap_label, curve in steps.items()
        }
    return out


def print_shedding(shedding: dict[str, Any]) -> None:
    print("\nLoad shedding: GET /v1/generations/{id} open-loop (answered = 200; shed = 503 + Retry-After)")
    header = f"{'database':<11} {'in-flight cap':<17} {'rate/s':>7} {'sent/s':>7} {'answered':>8} "
    print(header + f"{'shed':>6} {'failed':>6} {'p50 ms':>8} {'p99 ms':>9} {'max ms':>9} {'shed p99 ms':>11}")
    for label, curves in shedding.items():
        for cap_label, curve in curves.items():
            for st in curve["steps"]:
                print(
                    f"{label:<11} {cap_label:<17} {st['target_rate']:>7.0f} {st['achieved_rate']:>7.0f} "
                    f"{st['answered']:>8} {st['shed']:>6} {st['errors']:>6} {st['p50_s'] * 1000:>8.1f} "
                    f"{st['p99_s'] * 1000:>9.1f} {st['max_s'] * 1000:>9.1f} {st['shed_p99_s'] * 1000:>11.1f}"
                )
            print(
                f"{label:<11} {cap_label:<17} sheds from {curve['sheds_from_rate'] or 'no rate tried'} req/s"
            )


def plot_shedding(shedding: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (latency, shed) = plt.subplots(1, 2, figsize=(11, 4))
    for label, curves in shedding.items():
        for cap_label, curve in curves.items():
            rates = [st["target_rate"] for st in curve["steps"]]
            latency.plot(
                rates,
                [st["p99_s"] * 1000 for st in curve["steps"]],
                marker="o",
                label=f"{label}, {cap_label}",
            )
            shed.plot(
                rates,
                [st["shed"] / max(st["requests"], 1) for st in curve["steps"]],
                marker="o",
                label=f"{label}, {cap_label}",
            )
    latency.set(xlabel="offered GET rate (requests/s)", ylabel="p99 of answered reads (ms)", yscale="log")
    shed.set(xlabel="offered GET rate (requests/s)", ylabel="fraction shed (503)")
    latency.legend(fontsize=7)
    shed.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def full_run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """REST vs gRPC, submissions per second, reads at a fixed rate (as before)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from serving import export_repo, start_triton

    results: dict[str, Any] = {"databases": {}}
    triton = start_triton(export_repo(ROOT / "var" / "bench" / "batched", batching=True), work / "triton")
    try:
        data = work / f"sqlite-wait-{secrets.token_hex(3)}"
        data.mkdir()
        cp = ControlPlane(
            database_url=f"sqlite+aiosqlite:///{data / 'db.sqlite'}",
            data_dir=data,
            triton_url=triton.grpc_url,
            workers=2,
        )
        try:
            print("REST Prefer: wait vs direct gRPC ...", file=sys.stderr)
            results["rest_vs_grpc"] = asyncio.run(rest_vs_grpc(cp, triton.grpc_url, count=args.requests))
        finally:
            cp.stop()
    finally:
        triton.stop()

    pg_name = asyncio.run(_pg_create())
    try:
        for label, url in (
            ("sqlite", None),
            ("postgresql", pg_url(pg_name)),
        ):
            data = work / f"{label}-{secrets.token_hex(3)}"
            data.mkdir()
            url = url or f"sqlite+aiosqlite:///{data / 'db.sqlite'}"
            cp = ControlPlane(database_url=url, data_dir=data, triton_url="127.0.0.1:1", workers=0)
            try:
                print(f"{label}: submissions ...", file=sys.stderr)
                sub = asyncio.run(submissions(cp, count=args.submissions, concurrency=16))
                print(f"{label}: GET at {args.rate}/s ...", file=sys.stderr)
                reads = asyncio.run(reads_at_rate(cp, sub.pop("ids"), rate=args.rate, seconds=args.seconds))
                results["databases"][label] = {"submit": sub, "get": reads}
            finally:
                cp.stop()
    finally:
        asyncio.run(_pg_drop(pg_name))

    r = results["rest_vs_grpc"]
    print("\nREST (Prefer: wait) vs direct gRPC, same request (25 steps, guidance 5)")
    print(f"{'':<8} {'p50 s':>8} {'p95 s':>8}")
    print(f"{'REST':<8} {r['rest_p50_s']:>8.3f} {r['rest_p95_s']:>8.3f}")
    print(f"{'gRPC':<8} {r['grpc_p50_s']:>8.3f} {r['grpc_p95_s']:>8.3f}")
    print(f"{'overhead':<8} {r['overhead_p50_s']:>8.3f} {r['overhead_p95_s']:>8.3f}")
    print("\nJob submissions and reads")
    print(f"{'database':<11} {'submit/s':>9} {'GET rate':>9} {'p50 ms':>7} {'p99 ms':>7} {'errors':>7}")
    for label, d in results["databases"].items():
        g = d["get"]
        print(
            f"{label:<11} {d['submit']['per_s']:>9.0f} {g['achieved_rate']:>9.0f} {g['p50_s'] * 1000:>7.1f} "
            f"{g['p99_s'] * 1000:>7.1f} {g['errors']:>7}"
        )
    return results


if __name__ == "__main__":
    sys.exit(main())
