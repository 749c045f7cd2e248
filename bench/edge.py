"""The gRPC edge's added latency: the same ``pipeline`` calls through the edge and straight to
Triton, interleaved (edge, direct, direct, edge, ...) so that both see the same machine load.

Run with ``.venv/bin/python bench/edge.py``. It starts its own Triton (the demo model), a control
plane (uvicorn, SQLite) and the edge (Caddy), makes a user with an API key, then times N calls of
each kind per workload, one at a time:

* ``model_ready``: a call that costs Triton nothing: the edge's overhead alone (Caddy, the
  control plane's key check, rate-limit and quota look-ups, the access-log report);
* ``pipeline steps=1`` and ``pipeline steps=25`` (the demo default): real generations.

The table is printed; JSON in ``bench/results/edge.json``, the plot in ``bench/results/edge.png``.
On this project's shared 2-core machines the figures are noisy: read the differences side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results"
PROMPT = "a red circle on a white background"

from serving import export_repo, start_triton  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def start_control_plane(data: Path, triton_url: str):  # -> (server, thread, url, settings)
    import uvicorn

    from sfumato.control_plane import migrate
    from sfumato.control_plane.app import create_app
    from sfumato.control_plane.settings import Settings
    from sfumato.triton_server import free_port

    settings = Settings(
        env="test",
        secret_key=secrets.token_urlsafe(40),
        data_dir=data,
        workers=0,
        triton_url=triton_url,
        rate_limit="100000/minute",
        submit_rate_limit="100000/minute",
    )
    migrate.upgrade(settings.resolved_database_url)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("the control plane did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}", settings


def make_key(settings) -> str:  # type: ignore[no-untyped-def]
    from sfumato.control_plane import accounts
    from sfumato.control_plane.db import create_engine, session_factory

    async def make() -> str:
        engine = create_engine(settings.resolved_database_url)
        try:
            async with session_factory(engine)() as session:
                user = await accounts.create_user(session=session, name="bench", role="member")
                return (await accounts.create_key(session=session, user_id=user.id))[1]
        finally:
            await engine.dispose()

    return asyncio.run(make())


def time_calls(edge_url: str, triton_url: str, key: str, workload: str, n: int) -> dict[str, list[float]]:
    import tritonclient.grpc as grpcclient

    from sfumato.clients.triton_grpc import auth_headers, pipeline_inputs

    clients = {
        "edge": (grpcclient.InferenceServerClient(edge_url), auth_headers(key)),
        "direct": (grpcclient.InferenceServerClient(triton_url), None),
    }

    def call(kind: str, seed: int) -> None:
        client, headers = clients[kind]
        if workload == "model_ready":
            assert client.is_model_ready("pipeline", headers=headers)
            return
        steps = int(workload.rsplit("=", 1)[1])
        client.infer(
            "pipeline",
            pipeline_inputs(grpcclient, prompt=PROMPT, steps=steps, seed=seed),
            outputs=[grpcclient.InferRequestedOutput("images")],
            headers=headers,
            client_timeout=120,
        )

    for kind in clients:  # warm both paths (connections, Triton's first-call costs)
        for seed in range(3):
            call(kind, seed)
    times: dict[str, list[float]] = {"edge": [], "direct": []}
    for i in range(n):
        order = ("edge", "direct") if i % 2 == 0 else ("direct", "edge")
        for kind in order:
            started = time.perf_counter()
            call(kind, i)
            times[kind].append(time.perf_counter() - started)
    return times


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(results["workloads"])
    fig, axes = plt.subplots(1, len(workloads), figsize=(4 * len(workloads), 3.6))
    for ax, name in zip(axes, workloads, strict=True):
        row = results["workloads"][name]
        for offset, kind in enumerate(("direct", "edge")):
            values = [row[kind]["p50_ms"], row[kind]["p95_ms"]]
            ax.bar([x + offset * 0.38 for x in (0, 1)], values, width=0.36, label=kind)
        ax.set_xticks([0.19, 1.19], ["p50", "p95"])
        ax.set_title(f"{name}\nedge adds {row['added_p50_ms']:.1f} ms at p50")
        ax.set_ylabel("ms per call")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    from sfumato.control_plane.edge_proxy import EdgeProxy
    from sfumato.triton_server import free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100, help="calls of each kind per workload")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = ROOT / "var" / "bench"
    triton = start_triton(export_repo(work / "batched", batching=True), work / "triton-edge")
    data = work / f"edge-{secrets.token_hex(3)}"
    server, thread, api, settings = start_control_plane(data, triton.grpc_url)
    edge = EdgeProxy(
        work_dir=settings.data_dir / "edge",
        api=api,
        triton=triton.grpc_url,
        edge_key=settings.edge_secret(),
        port=free_port(),
    )
    edge.start()
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "calls": args.calls,
        "workloads": {},
    }
    try:
        key = make_key(settings)
        for workload in ("model_ready", "pipeline steps=1", "pipeline steps=25"):
            print(f"{workload} ...", file=sys.stderr)
            times = time_calls(edge.url, triton.grpc_url, key, workload, args.calls)
            row = {
                kind: {
                    "p50_ms": percentile(values, 50) * 1000,
                    "p95_ms": percentile(values, 95) * 1000,
                    "mean_ms": float(np.mean(values)) * 1000,
                }
                for kind, values in times.items()
            }
            row["added_p50_ms"] = row["edge"]["p50_ms"] - row["direct"]["p50_ms"]
            row["added_p95_ms"] = row["edge"]["p95_ms"] - row["direct"]["p95_ms"]
            paired = np.asarray(times["edge"]) - np.asarray(times["direct"])
            row["paired_difference_p50_ms"] = float(np.median(paired)) * 1000
            results["workloads"][workload] = row
    finally:
        edge.stop()
        server.should_exit = True
        thread.join(timeout=60)
        triton.stop()

    header = ("workload", "direct p50", "edge p50", "direct p95", "edge p95", "added p50")
    print("\n{:<20} {:>11} {:>9} {:>11} {:>9} {:>10}".format(*header))
    for name, row in results["workloads"].items():
        print(
            f"{name:<20} {row['direct']['p50_ms']:>9.1f}ms {row['edge']['p50_ms']:>7.1f}ms "
            f"{row['direct']['p95_ms']:>9.1f}ms {row['edge']['p95_ms']:>7.1f}ms {row['added_p50_ms']:>8.1f}ms"
        )
    (args.out / "edge.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "edge.png")
    print(f"\nsaved {args.out / 'edge.json'} and {args.out / 'edge.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
