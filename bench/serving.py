"""Serving benchmarks: the UNet alone and the whole pipeline, Triton against its anchors.

Run with ``make bench`` (or ``.venv/bin/python bench/serving.py``). Every figure that matters
is a ratio of measurements taken side by side in this one run; the table is printed and saved
as ``bench/results/serving.json``, the plot as ``bench/results/serving.png``.

* UNet alone: Triton (python backend + ONNX Runtime, dynamic batching) at concurrency 1/8/32,
  one row per request, against in-process ONNX Runtime at batch 1/8/32 (the ceiling).
* End to end (demo model, 25 steps, guidance 5): the Triton pipeline at concurrency 1/4/16,
  against diffusers' ``StableDiffusionPipeline`` in-process (one request at a time) and against
  the same Triton pipeline with dynamic batching off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "sfumato-shapes"
RESULTS = ROOT / "bench" / "results"
PROMPTS = [
    "a red circle on a white background",
    "a blue square on a yellow background",
    "a green triangle on a black background",
    "a purple circle on a orange background",
]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# --------------------------------------------------------------------------- set-up


def export_repo(out: Path, *, batching: bool) -> Path:
    from sfumato.export.repository import ExportOptions, export_model_repository

    manifest = out / "export_manifest.json"
    if manifest.exists():
        settings = json.loads(manifest.read_text())["settings"]
        if settings.get("dynamic_batching") == batching:
            return out
    export_model_repository(
        DEMO, out, ExportOptions(target="cpu", default_guidance=5.0, dynamic_batching=batching)
    )
    return out


def start_triton(repo: Path, work: Path):
    import secrets

    from sfumato.triton_server import TritonServer, free_port

    server = TritonServer(
        repository=repo,
        work_dir=work,
        admin_key=secrets.token_urlsafe(32),
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        exit_timeout_secs=10,
    )
    server.start(timeout=300)
    return server


# --------------------------------------------------------------------------- UNet alone


def unet_inputs(rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "sample": rng.standard_normal((rows, 4, 8, 8), dtype=np.float32),
        "timestep": np.full((rows,), 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((rows, 16, 64), dtype=np.float32),
    }


def bench_unet_inprocess(repo: Path, *, batches: list[int], seconds: float) -> dict[int, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(repo / "unet" / "1" / "model.onnx"), options)
    rows_per_s = {}
    for batch in batches:
        feed = unet_inputs(batch)
        for _ in range(5):
            session.run(None, feed)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            session.run(None, feed)
            done += batch
        rows_per_s[batch] = done / (time.perf_counter() - start)
    return rows_per_s


async def _unet_load(url: str, *, concurrency: int, seconds: float) -> float:
    import tritonclient.grpc.aio as aio

    client = aio.InferenceServerClient(url)
    feed = unet_inputs(1)
    inputs = []
    for name, value in feed.items():
        value = value.reshape(1, 1) if name == "timestep" else value
        tensor = aio.InferInput(name, list(value.shape), "FP32")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await client.infer("unet", inputs)
            done += 1

    for _ in range(3):
        await client.infer("unet", inputs)
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await client.close()
    return done / elapsed


def unet_batch_sizes(url: str) -> dict[int, int]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    stats = client.get_inference_statistics("unet", as_json=True)["model_stats"][0]
    client.close()
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


# --------------------------------------------------------------------------- end to end


async def _pipeline_load(url: str, *, concurrency: int, requests: int) -> dict[str, Any]:
    import tritonclient.grpc.aio as aio

    from sfumato.clients.triton_grpc import pipeline_inputs

    client = aio.InferenceServerClient(url)
    latencies: list[float] = []
    queue = list(range(requests))

    async def worker() -> None:
        while queue:
            i = queue.pop()
            inputs = pipeline_inputs(
                aio, prompt=PROMPTS[i % len(PROMPTS)], seed=i, steps=25, guidance_scale=5.0, scheduler="ddim"
            )
            t0 = time.perf_counter()
            await client.infer("pipeline", inputs)
            latencies.append(time.perf_counter() - t0)

    await client.infer("pipeline", pipeline_inputs(aio, prompt=PROMPTS[0], steps=2))
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await client.close()
    return {
        "images_per_s": requests / elapsed,
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
        "requests": requests,
    }


def bench_diffusers(*, requests: int) -> dict[str, Any]:
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(os.cpu_count() or 1)
    pipe = StableDiffusionPipeline.from_pretrained(str(DEMO))
    pipe.set_progress_bar_config(disable=True)
    latencies = []
    with torch.inference_mode():
        pipe(PROMPTS[0], num_inference_steps=2, output_type="np")
        start = time.perf_counter()
        for i in range(requests):
            t0 = time.perf_counter()
            pipe(
                PROMPTS[i % len(PROMPTS)],
                num_inference_steps=25,
                guidance_scale=5.0,
                generator=torch.Generator().manual_seed(i),
                output_type="np",
            )
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
    return {
        "images_per_s": requests / elapsed,
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
        "requests": requests,
    }


# --------------------------------------------------------------------------- report


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    unet = results["unet"]
    conc = sorted(int(c) for c in unet["triton_req_per_s"])
    left.plot(conc, [unet["triton_req_per_s"][str(c)] for c in conc], "o-", label="Triton (1 row/request)")
    batches = sorted(int(b) for b in unet["onnxruntime_rows_per_s"])
    left.plot(
        batches,
        [unet["onnxruntime_rows_per_s"][str(b)] for b in batches],
        "s--",
        label="ONNX Runtime in-process (batch = x)",
    )
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrency / batch size")
    left.set_ylabel("UNet rows per second")
    left.set_title("UNet alone")
    left.legend()
    e2e = results["end_to_end"]
    for key, label, style in (
        ("triton", "Triton pipeline", "o-"),
        ("triton_no_batching", "Triton, batching off", "^-"),
    ):
        conc = sorted(int(c) for c in e2e[key])
        right.plot(conc, [e2e[key][str(c)]["images_per_s"] for c in conc], style, label=label)
    right.axhline(e2e["diffusers"]["images_per_s"], color="grey", linestyle=":", label="diffusers in-process")
    right.set_xscale("log", base=2)
    right.set_xlabel("concurrent requests")
    right.set_ylabel("images per second")
    right.set_title("End to end: 25 steps, guidance 5, 32x32")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each UNet measurement")
    parser.add_argument("--requests", type=int, default=48, help="pipeline requests per concurrency level")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = ROOT / "var" / "bench"
    batched = export_repo(work / "batched", batching=True)
    unbatched = export_repo(work / "unbatched", batching=False)

    print("UNet in-process ONNX Runtime ...", file=sys.stderr)
    ort_rows = bench_unet_inprocess(batched, batches=[1, 8, 32], seconds=args.seconds)
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "unet": {"onnxruntime_rows_per_s": {str(k): v for k, v in ort_rows.items()}, "triton_req_per_s": {}},
        "end_to_end": {"triton": {}, "triton_no_batching": {}},
    }
    server = start_triton(batched, work / "triton-batched")
    try:
        before = unet_batch_sizes(server.grpc_url)
        for concurrency in (1, 8, 32):
            print(f"UNet through Triton, concurrency {concurrency} ...", file=sys.stderr)
            rate = asyncio.run(_unet_load(server.grpc_url, concurrency=concurrency, seconds=args.seconds))
            results["unet"]["triton_req_per_s"][str(concurrency)] = rate
        after = unet_batch_sizes(server.grpc_url)
        results["unet"]["triton_batch_sizes_seen"] = {
            str(k): after[k] - before.get(k, 0) for k in sorted(after) if after[k] > before.get(k, 0)
        }
        before = unet_batch_sizes(server.grpc_url)
        for concurrency in (1, 4, 16):
            print(f"pipeline through Triton, concurrency {concurrency} ...", file=sys.stderr)
            results["end_to_end"]["triton"][str(concurrency)] = asyncio.run(
                _pipeline_load(server.grpc_url, concurrency=concurrency, requests=args.requests)
            )
        after = unet_batch_sizes(server.grpc_url)
        results["end_to_end"]["unet_batch_sizes_seen"] = {
            str(k): after[k] - before.get(k, 0) for k in sorted(after) if after[k] > before.get(k, 0)
        }
    finally:
        server.stop()
    server = start_triton(unbatched, work / "triton-unbatched")
    try:
        for concurrency in (1, 4, 16):
            print(f"pipeline through Triton without batching, concurrency {concurrency} ...", file=sys.stderr)
            results["end_to_end"]["triton_no_batching"][str(concurrency)] = asyncio.run(
                _pipeline_load(server.grpc_url, concurrency=concurrency, requests=args.requests)
            )
    finally:
        server.stop()
    print("diffusers in-process ...", file=sys.stderr)
    results["end_to_end"]["diffusers"] = bench_diffusers(requests=max(args.requests // 3, 8))

    best_ort = max(ort_rows.values())
    triton32 = results["unet"]["triton_req_per_s"]["32"]
    e2e = results["end_to_end"]
    t16 = e2e["triton"]["16"]["images_per_s"]
    results["ratios"] = {
        "unet_triton_c32_over_onnxruntime_best": triton32 / best_ort,
        "e2e_triton_c16_over_diffusers": t16 / e2e["diffusers"]["images_per_s"],
        "e2e_triton_c16_over_no_batching_c16": t16 / e2e["triton_no_batching"]["16"]["images_per_s"],
    }

    print("\nUNet alone (8x8 latents; rows/s)")
    print(f"{'':>6} {'ORT batch=x':>12} {'Triton conc=x':>14}")
    for x in (1, 8, 32):
        print(f"{x:>6} {ort_rows[x]:>12.0f} {results['unet']['triton_req_per_s'][str(x)]:>14.0f}")
    print(f"batch sizes formed by Triton: {results['unet']['triton_batch_sizes_seen']}")
    print("\nEnd to end (25 steps, guidance 5): images/s, p50 / p95 latency")
    print(f"{'':<22} {'conc':>4} {'img/s':>7} {'p50 s':>7} {'p95 s':>7}")
    for key, label in (("triton", "Triton pipeline"), ("triton_no_batching", "Triton, batching off")):
        for c in (1, 4, 16):
            r = e2e[key][str(c)]
            print(f"{label:<22} {c:>4} {r['images_per_s']:>7.2f} {r['p50_s']:>7.3f} {r['p95_s']:>7.3f}")
    d = e2e["diffusers"]
    print(
        f"{'diffusers in-process':<22} {1:>4} {d['images_per_s']:>7.2f} {d['p50_s']:>7.3f} {d['p95_s']:>7.3f}"
    )
    print(f"UNet batch sizes seen end to end: {e2e['unet_batch_sizes_seen']}")
    print("\nRatios (targets: >= 0.8, >= 3, >= 2)")
    for key, value in results["ratios"].items():
        print(f"  {key:<42} {value:6.2f}")
    (args.out / "serving.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "serving.png")
    print(f"\nsaved {args.out / 'serving.json'} and {args.out / 'serving.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
