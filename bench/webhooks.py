"""Webhook benchmarks: what the outbox costs a job event, and how fast deliveries go out.

Run with ``.venv/bin/python bench/webhooks.py`` (``--quick`` for a short run). In process, on a
real SQLite file and a real PostgreSQL database (127.0.0.1:5432, a fresh database), with a real
local HTTP receiver (aiohttp, 204) on loopback, listed in ``SFUMATO_WEBHOOK_ALLOWED_HOSTS``.
Printed as a table and saved as ``bench/results/webhooks.json`` and ``webhooks.png``.

* **Publish cost**: ``events.publish`` of a ``progress`` event, each in its own committed
  transaction, for a job without a webhook and for a job with one (the outbox row written in the
  same transaction), interleaved in one run: ms per event and the ratio.
* **Delivery throughput**: N queued deliveries, one :class:`Dispatcher` running (its real loop:
  claims under leases, concurrent sends, one recording transaction per attempt) until all are
  delivered: deliveries/s at ``SFUMATO_WEBHOOK_CONCURRENCY`` 1 and 16, and the attempts' p50 / p95.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
from aiohttp import web
from sqlalchemy import func, select

from sfumato.control_plane import events, migrate, webhooks
from sfumato.control_plane.models import Job, User, WebhookAttempt, WebhookDelivery
from sfumato.control_plane.services import Services
from sfumato.control_plane.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PG_ADMIN = os.environ.get("SFUMATO_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def start_receiver() -> tuple[web.AppRunner, int]:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def make_jobs(services: Services, url: str) -> tuple[str, str]:
    async with services.sessions() as session:
        session.add(User(id="bench", name="bench"))
        await session.flush()
        session.add(Job(id="plain", owner_id="bench", params={}, model_name="pipeline"))
        session.add(Job(id="hooked", owner_id="bench", params={}, model_name="pipeline", webhook=url))
        await session.commit()
    return "plain", "hooked"


async def publish_cost(services: Services, *, events_n: int) -> dict[str, Any]:
    """ms per committed publish, with and without a webhook on the job, interleaved."""
    times: dict[str, list[float]] = {"plain": [], "hooked": []}
    for i in range(events_n):
        for job_id in ("plain", "hooked") if i % 2 else ("hooked", "plain"):
            started = time.perf_counter()
            async with services.sessions() as session:
                await events.publish(
                    session=session, job_id=job_id, kind="progress", data={"step": i, "total": events_n}
                )
                await session.commit()
            times[job_id].append((time.perf_counter() - started) * 1000)
    plain, hooked = (float(np.median(times[k])) for k in ("plain", "hooked"))
    return {
        "events": events_n,
        "plain_ms_p50": plain,
        "webhook_ms_p50": hooked,
        "ratio": hooked / plain,
        "plain_ms_p95": pct(times["plain"], 95),
        "webhook_ms_p95": pct(times["hooked"], 95),
    }


async def delivery_throughput(services: Services, *, concurrency: int) -> dict[str, Any]:
    async with services.sessions() as session:
        pending = await session.scalar(
            select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.status == "pending")
        )
    services.settings.webhook_concurrency = concurrency
    dispatcher = webhooks.Dispatcher(services, name=f"bench-{concurrency}")
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        while True:
            await asyncio.sleep(0.05)
            async with services.sessions() as session:
                left = await session.scalar(
                    select(func.count())
                    .select_from(WebhookDelivery)
                    .where(WebhookDelivery.status == "pending")
                )
            if not left:
                break
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        await task
    async with services.sessions() as session:
        durations = list(
            (
                await session.scalars(
                    select(WebhookAttempt.duration_ms)
                    .join(WebhookDelivery)
                    .where(WebhookDelivery.status == "delivered", WebhookAttempt.outcome == "delivered")
                )
            ).all()
        )
        delivered = await session.scalar(
            select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.status == "delivered")
        )
        await session.execute(WebhookDelivery.__table__.delete())
        await session.commit()
    return {
        "concurrency": concurrency,
        "deliveries": pending,
        "delivered": delivered,
        "seconds": elapsed,
        "per_s": (pending or 0) / elapsed,
        "attempt_ms_p50": pct(durations, 50),
        "attempt_ms_p95": pct(durations, 95),
    }


async def enqueue_many(services: Services, n: int) -> None:
    async with services.sessions() as session:
        for i in range(n):
            await webhooks.enqueue_job_event(session=session, job_id="hooked", kind="progress", data={"i": i})
        await session.commit()


async def run_database(
    name: str, url: str, work: Path, args: argparse.Namespace, port: int
) -> dict[str, Any]:
    await asyncio.to_thread(migrate.upgrade, url)
    settings = Settings(
        env="test",
        database_url=url,
        data_dir=work / name,
        webhook_allowed_hosts=["127.0.0.1"],
        webhook_poll_s=0.05,
        webhook_max_in_flight_per_endpoint=16,  # one receiver here: let the dispatcher fill its slots
    )
    services = Services.build(settings)
    try:
        await make_jobs(services, f"http://127.0.0.1:{port}/hook")
        cost = await publish_cost(services, events_n=args.events)
        async with services.sessions() as session:  # the deliveries the publish runs made
            await session.execute(WebhookDelivery.__table__.delete())
            await session.commit()
        rates = []
        for concurrency in (1, 16):
            await enqueue_many(services, args.deliveries)
            rates.append(await delivery_throughput(services, concurrency=concurrency))
        return {"database": name, "publish": cost, "delivery": rates}
    finally:
        await services.close()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    runner, port = await start_receiver()
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            results.append(
                await run_database("sqlite", f"sqlite+aiosqlite:///{work / 'bench.db'}", work, args, port)
            )
            db = f"sfumato_bench_{secrets.token_hex(4)}"
            admin = await asyncpg.connect(PG_ADMIN)
            await admin.execute(f"CREATE DATABASE {db}")
            try:
                base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
                results.append(await run_database("postgresql", f"{base}/{db}", work, args, port))
            finally:
                await admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
                await admin.close()
    finally:
        await runner.cleanup()
    return {"events": args.events, "deliveries": args.deliveries, "results": results}


def report(data: dict[str, Any]) -> None:
    print("\nPublish cost (ms per committed events.publish, p50; side by side)")
    print(f"{'database':<12}{'no webhook':>12}{'webhook':>10}{'ratio':>8}")
    for r in data["results"]:
        p = r["publish"]
        print(f"{r['database']:<12}{p['plain_ms_p50']:>12.2f}{p['webhook_ms_p50']:>10.2f}{p['ratio']:>8.2f}")
    print("\nDelivery throughput (one dispatcher, local receiver answering 204)")
    print(f"{'database':<12}{'concurrency':>12}{'deliveries/s':>14}{'attempt p50 ms':>16}{'p95 ms':>9}")
    for r in data["results"]:
        for d in r["delivery"]:
            print(
                f"{r['database']:<12}{d['concurrency']:>12}{d['per_s']:>14.1f}"
                f"{d['attempt_ms_p50']:>16.2f}{d['attempt_ms_p95']:>9.2f}"
            )


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["database"] for r in data["results"]]
    x = np.arange(len(names))
    left.bar(x - 0.2, [r["publish"]["plain_ms_p50"] for r in data["results"]], 0.4, label="no webhook")
    left.bar(x + 0.2, [r["publish"]["webhook_ms_p50"] for r in data["results"]], 0.4, label="webhook")
    left.set_xticks(x, names)
    left.set_ylabel("ms per committed publish (p50)")
    left.set_title("Outbox cost per job event")
    left.legend()
    for i, concurrency in enumerate((1, 16)):
        right.bar(
            x + (i - 0.5) * 0.4,
            [r["delivery"][i]["per_s"] for r in data["results"]],
            0.4,
            label=f"concurrency {concurrency}",
        )
    right.set_xticks(x, names)
    right.set_ylabel("deliveries / s")
    right.set_title("One dispatcher, local receiver")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=400, help="publishes per kind of job")
    parser.add_argument("--deliveries", type=int, default=1000, help="deliveries per throughput run")
    parser.add_argument("--quick", action="store_true", help="100 events, 200 deliveries")
    parsed = parser.parse_args()
    if parsed.quick:
        parsed.events, parsed.deliveries = 100, 200
    out = asyncio.run(main(parsed))
    report(out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "webhooks.json").write_text(json.dumps(out, indent=2))
    plot(out, RESULTS / "webhooks.png")
    print(f"\nsaved {RESULTS / 'webhooks.json'} and {RESULTS / 'webhooks.png'}", file=sys.stderr)
