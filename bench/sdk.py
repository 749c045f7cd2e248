"""SDK benchmark: what the Python SDK's ``generate`` costs over the plainest HTTP client doing
the same work, side by side on one server in one run.

Run with ``.venv/bin/python bench/sdk.py`` (``make bench`` runs it too). Real processes: a
``tritonserver`` (the demo model) and ``sfumato serve`` (uvicorn, SQLite, one worker) over HTTP
on loopback; 25 steps, guidance 5, 32x32, one image. Printed as a table, saved as
``bench/results/sdk.json`` and ``bench/results/sdk.png``.

Each variant runs at concurrency 1 and 8, in three alternating rounds (a noisy minute on this
shared machine falls on every variant):

* ``httpx``: ``POST /v1/generations`` with ``Prefer: wait=60``, then ``GET`` the PNG (bytes).
* ``sdk``: ``AsyncClient.generate``: the same two calls, plus the request checked against
  ``GenerationCreate``, the answer parsed into ``GenerationOut``, an ``Idempotency-Key``, and the
  PNG decoded into a PIL image.
* ``sdk+events``: ``generate`` with a progress callback: submitted without waiting, then the
  generation's event stream (Server-Sent Events) followed to its end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
REQUEST = {"prompt": "a red circle on a white background", "steps": 25, "guidance_scale": 5.0}
VARIANTS = ("httpx", "sdk", "sdk+events")

sys.path.insert(0, str(ROOT / "bench"))
from serving import export_repo, start_triton  # noqa: E402

from control_plane import ControlPlane, pct  # noqa: E402


def _caller(variant: str, http: httpx.AsyncClient, sdk: Any):  # -> async (seed) -> None
    async def plain(seed: int) -> None:
        r = await http.post("/v1/generations", json={**REQUEST, "seed": seed}, headers={"Prefer": "wait=60"})
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        png = await http.get(r.json()["images"][0]["url"])
        assert png.status_code == 200 and png.content

    async def with_sdk(seed: int) -> None:
        (image,) = await sdk.generate(REQUEST["prompt"], steps=25, guidance_scale=5.0, seed=seed)
        assert image.size == (32, 32)

    async def with_events(seed: int) -> None:
        seen: list[Any] = []
        (image,) = await sdk.generate(
            REQUEST["prompt"], steps=25, guidance_scale=5.0, seed=seed, on_progress=seen.append
        )
        assert image.size == (32, 32) and seen[-1].status == "succeeded"

    return {"httpx": plain, "sdk": with_sdk, "sdk+events": with_events}[variant]


async def _level(cp: ControlPlane, *, concurrency: int, requests: int, rounds: int) -> dict[str, Any]:
    from sfumato.clients import AsyncClient

    latencies: dict[str, list[float]] = {v: [] for v in VARIANTS}
    elapsed: dict[str, float] = dict.fromkeys(VARIANTS, 0.0)
    per_round = max(requests // rounds, concurrency)
    seed = secrets.randbelow(2**31)
    async with (
        httpx.AsyncClient(base_url=cp.url, headers=cp.headers, timeout=300) as http,
        AsyncClient(cp.url, api_key=cp.key, timeout=300) as sdk,
    ):
        for variant in VARIANTS:  # warm-up: connections, the model's first calls
            await _caller(variant, http, sdk)(seed)
        for _ in range(rounds):
            for variant in VARIANTS:
                call = _caller(variant, http, sdk)
                queue = list(range(per_round))

                async def client(call=call, variant=variant, queue=queue) -> None:  # type: ignore[no-untyped-def]
                    nonlocal seed
                    while queue:
                        queue.pop()
                        seed += 1
                        t0 = time.perf_counter()
                        await call(seed)
                        latencies[variant].append(time.perf_counter() - t0)

                started = time.perf_counter()
                await asyncio.gather(*(client() for _ in range(concurrency)))
                elapsed[variant] += time.perf_counter() - started
    return {
        v: {
            "requests": len(latencies[v]),
            "images_per_s": len(latencies[v]) / elapsed[v],
            "p50_s": pct(latencies[v], 50),
            "p95_s": pct(latencies[v], 95),
        }
        for v in VARIANTS
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted(results["levels"], key=int)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(VARIANTS)
    for i, variant in enumerate(VARIANTS):
        xs = [j + i * width for j in range(len(levels))]
        left.bar(xs, [results["levels"][c][variant]["p50_s"] * 1000 for c in levels], width, label=variant)
        right.bar(xs, [results["levels"][c][variant]["images_per_s"] for c in levels], width, label=variant)
    for axis, title in ((left, "p50 latency (ms)"), (right, "images per second")):
        axis.set_xticks([j + width for j in range(len(levels))], [f"concurrency {c}" for c in levels])
        axis.set_title(title)
        axis.legend()
    fig.suptitle("generate through the SDK vs plain httpx (25 steps, 32x32, one worker)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=24, help="requests per variant and level")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, help="keep the export, logs and database here")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sfumato-bench-sdk-") as tmp:
        work = args.work or Path(tmp)
        repo = export_repo(work / "model_repository", batching=True)
        triton = start_triton(repo, work / "triton")
        data = work / f"cp-{secrets.token_hex(3)}"
        data.mkdir(parents=True)
        cp = ControlPlane(
            database_url=f"sqlite+aiosqlite:///{data / 'db.sqlite'}",
            data_dir=data,
            triton_url=triton.grpc_url,
            workers=1,
        )
        try:
            levels = {
                str(c): asyncio.run(_level(cp, concurrency=c, requests=args.requests, rounds=args.rounds))
                for c in args.concurrency
            }
        finally:
            cp.stop()
            triton.stop()
    results = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "request": REQUEST,
        "levels": levels,
    }
    header = ("concurrency", "variant", "images/s", "p50 ms", "p95 ms", "p50 vs httpx")
    print("{:>11} {:>11} {:>9} {:>8} {:>8} {:>13}".format(*header))
    for c, rows in levels.items():
        base = rows["httpx"]["p50_s"]
        for variant, row in rows.items():
            print(
                f"{c:>11} {variant:>11} {row['images_per_s']:>9.2f} {row['p50_s'] * 1000:>8.1f} "
                f"{row['p95_s'] * 1000:>8.1f} {row['p50_s'] / base:>12.2f}x"
            )
    (args.out / "sdk.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "sdk.png")
    print(f"saved {args.out / 'sdk.json'} and {args.out / 'sdk.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
