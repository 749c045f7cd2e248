"""Streaming benchmark: what ``pipeline_stream``'s per-step responses and previews cost against
the plain ``pipeline``, side by side on one Triton in one run.

Run with ``.venv/bin/python bench/stream.py`` (``make bench`` runs it too). The demo model,
25 steps, guidance 5, DDIM, 32x32. Printed as a table, saved as
``bench/results/stream.json`` and ``bench/results/stream.png``.

Each variant runs alone at concurrency 1 and 16, in three alternating rounds.

* ``pipeline``: one ``infer`` per request (``tritonclient.grpc.aio``).
* ``stream``: ``pipeline_stream`` over ``stream_infer`` (``astream_generate``): 25 progress
  responses, then the images; also the time to the first progress response.
* ``stream+previews``: the same with ``preview_every=5`` (4 VAE decodes more per request).
* ``mixed``: half the requests on each model at once; the UNet batches that hold rows of both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from serving import PROMPTS, ROOT, percentile, start_triton, unet_batch_sizes

RESULTS = ROOT / "bench" / "results"
DEMO = ROOT / "models" / "sfumato-shapes"
REQUEST = {"steps": 25, "guidance_scale": 5.0, "scheduler": "ddim"}
VARIANTS = ("pipeline", "stream", "stream+previews")


def export_repo(out: Path) -> Path:
    from sfumato.export.repository import ExportOptions, export_model_repository

    if not (out / "pipeline_stream" / "config.pbtxt").exists():
        export_model_repository(DEMO, out, ExportOptions(target="cpu", default_guidance=5.0))
    return out


async def _one(client: Any, variant: str, i: int) -> tuple[float, float | None]:
    """``(latency to the images, latency to the first progress response or None)``."""
    import tritonclient.grpc.aio as aio

    from sfumato.clients.triton_grpc import Progress, astream_generate, pipeline_inputs

    prompt = PROMPTS[i % len(PROMPTS)]
    t0 = time.perf_counter()
    if variant == "pipeline":
        await client.infer("pipeline", pipeline_inputs(aio, prompt=prompt, seed=i, **REQUEST))
        return time.perf_counter() - t0, None
    first = None
    previews = 5 if variant == "stream+previews" else None
    async with contextlib.aclosing(
        astream_generate(client, prompt, seed=i, preview_every=previews, **REQUEST)
    ) as events:
        async for event in events:
            if first is None and isinstance(event, Progress):
                first = time.perf_counter() - t0
    return time.perf_counter() - t0, first


async def _level(url: str, *, concurrency: int, requests: int, rounds: int = 3) -> dict[str, dict[str, Any]]:
    """Each variant alone at ``concurrency``, in alternating rounds (so that a noisy minute on
    this shared machine falls on every variant): images/s over its own phases, latencies."""
    import tritonclient.grpc.aio as aio

    client = aio.InferenceServerClient(url)
    for variant in VARIANTS:  # warm up
        await _one(client, variant, 0)
    rows: dict[str, list[tuple[float, float | None]]] = {v: [] for v in VARIANTS}
    elapsed: dict[str, float] = dict.fromkeys(VARIANTS, 0.0)
    per_round = max(requests // rounds, concurrency)
    for r in range(rounds):
        for variant in VARIANTS:
            todo = list(range(r * per_round, (r + 1) * per_round))

            async def worker(variant: str = variant, todo: list[int] = todo) -> None:
                while todo:
                    rows[variant].append(await _one(client, variant, todo.pop()))

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed[variant] += time.perf_counter() - start
    await client.close()
    out = {}
    for variant, done in rows.items():
        latencies = [d[0] for d in done]
        firsts = [d[1] for d in done if d[1] is not None]
        out[variant] = {
            "images_per_s": len(done) / elapsed[variant],
            "p50_s": percentile(latencies, 50),
            "p95_s": percentile(latencies, 95),
            "first_progress_p50_s": percentile(firsts, 50) if firsts else None,
            "requests": len(done),
        }
    return out


async def _mixed(url: str, *, concurrency: int, requests: int) -> dict[str, Any]:
    import tritonclient.grpc.aio as aio

    client = aio.InferenceServerClient(url)
    before = unet_batch_sizes(url)
    todo = [("pipeline" if k % 2 else "stream", k) for k in range(requests)]

    async def worker() -> None:
        while todo:
            variant, k = todo.pop(0)
            await _one(client, variant, k)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await client.close()
    after = unet_batch_sizes(url)
    grown = {k: after[k] - before.get(k, 0) for k in sorted(after) if after[k] > before.get(k, 0)}
    return {
        "images_per_s": requests / elapsed,
        "unet_batch_sizes_seen": {str(k): v for k, v in grown.items()},
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    levels = sorted(int(c) for c in results["levels"])
    for variant, style in zip(VARIANTS, ("o-", "s--", "^:"), strict=True):
        left.plot(
            levels, [results["levels"][str(c)][variant]["images_per_s"] for c in levels], style, label=variant
        )
        right.plot(
            levels, [results["levels"][str(c)][variant]["p50_s"] for c in levels], style, label=variant
        )
    for axis, label in ((left, "images per second"), (right, "p50 latency to the images (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent requests")
        axis.set_ylabel(label)
        axis.legend()
    left.set_title("pipeline vs pipeline_stream: throughput")
    right.set_title("latency (25 steps, guidance 5, 32x32)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=24, help="requests per variant and level")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = ROOT / "var" / "bench"
    repo = export_repo(work / "stream")
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "request": REQUEST,
        "levels": {},
    }
    server = start_triton(repo, work / "triton-stream")
    try:
        for concurrency in (1, 16):
            print(f"concurrency {concurrency} ...", file=sys.stderr)
            results["levels"][str(concurrency)] = asyncio.run(
                _level(server.grpc_url, concurrency=concurrency, requests=args.requests)
            )
        print("mixed, concurrency 16 ...", file=sys.stderr)
        results["mixed_c16"] = asyncio.run(
            _mixed(server.grpc_url, concurrency=16, requests=2 * args.requests)
        )
    finally:
        server.stop()

    c1, c16 = results["levels"]["1"], results["levels"]["16"]
    results["ratios"] = {
        "stream_over_pipeline_images_per_s_c16": c16["stream"]["images_per_s"]
        / c16["pipeline"]["images_per_s"],
        "previews_over_pipeline_images_per_s_c16": c16["stream+previews"]["images_per_s"]
        / c16["pipeline"]["images_per_s"],
        "stream_minus_pipeline_p50_ms_c1": 1000 * (c1["stream"]["p50_s"] - c1["pipeline"]["p50_s"]),
        "previews_minus_pipeline_p50_ms_c1": 1000
        * (c1["stream+previews"]["p50_s"] - c1["pipeline"]["p50_s"]),
    }
    print("\npipeline vs pipeline_stream (25 steps, guidance 5, 32x32), alternating rounds in one run")
    print(f"{'variant':<16} {'conc':>4} {'img/s':>7} {'p50 s':>7} {'p95 s':>7} {'1st step p50 s':>15}")
    for concurrency in ("1", "16"):
        for variant in VARIANTS:
            r = results["levels"][concurrency][variant]
            first = "" if r["first_progress_p50_s"] is None else f"{r['first_progress_p50_s']:.3f}"
            print(
                f"{variant:<16} {concurrency:>4} {r['images_per_s']:>7.2f} {r['p50_s']:>7.3f} "
                f"{r['p95_s']:>7.3f} {first:>15}"
            )
    mixed = results["mixed_c16"]
    print(f"\nmixed (half on each model), concurrency 16: {mixed['images_per_s']:.2f} images/s")
    print(f"UNet batch sizes seen: {mixed['unet_batch_sizes_seen']}")
    print("\nRatios")
    for key, value in results["ratios"].items():
        print(f"  {key:<42} {value:8.2f}")
    (args.out / "stream.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "stream.png")
    print(f"\nsaved {args.out / 'stream.json'} and {args.out / 'stream.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
