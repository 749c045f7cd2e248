"""What a new version, a deploy and a rollback cost, through a real Triton.

Run with ``.venv/bin/python bench/registry.py``. A ``tritonserver`` serves the demo model
(``make model``'s export settings, ``--pipeline-instances`` pipeline instances) and the control
plane runs in this process (the app over httpx's ASGI transport, SQLite, one in-process worker).
Measured, in one run:

* **publish**: ``export_version`` (ONNX export + parity checks) of the demo model as version 2,
  then ``publish_version``: Triton's repository API loads the six Triton models' version 2 beside
  version 1, and one validation prompt runs on it;
* **deploy / rollback**: ``POST /v1/models/{name}/versions/{v}/deploy`` and ``.../rollback``,
  ``--switches`` times each, alternating, *under steady traffic* (``--clients`` clients submitting
  with ``Prefer: wait`` and no pause); the generations' latency in the traffic before the first
  switch and during the switches, and every failed request counted;
* **delete**: ``DELETE /v1/models/{name}/versions/3`` of a third, undeployed version (files
  removed, Triton loads the models again without it).

Printed as a table; saved as ``bench/results/registry.json`` and ``registry.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEMO = ROOT / "models" / "sfumato-shapes"
REQUEST = {"prompt": "a red circle on a white background", "steps": 10}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from sfumato.control_plane import accounts, migrate, registry
    from sfumato.control_plane.app import create_app
    from sfumato.control_plane.settings import Settings
    from sfumato.export.repository import ExportOptions, export_model_repository
    from sfumato.export.versions import export_version
    from sfumato.triton_server import TritonServer, free_port

    repository = work / "model_repository"
    export_model_repository(
        DEMO,
        repository,
        ExportOptions(target="cpu", default_guidance=5.0, pipeline_instances=args.pipeline_instances),
    )
    admin_key = secrets.token_urlsafe(32)
    server = TritonServer(
        repository=repository,
        work_dir=work / "triton",
        admin_key=admin_key,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        exit_timeout_secs=30,
    )
    (work / "triton").mkdir()
    server.start(timeout=600)
    database = f"sqlite+aiosqlite:///{work / 'db.sqlite'}"
    migrate.upgrade(database)
    settings = Settings(
        env="test",
        secret_key=secrets.token_urlsafe(48),
        database_url=database,
        data_dir=work / "data",
        workers=1,
        triton_url=server.grpc_url,
        triton_admin_key=admin_key,
        model_repository=repository,
        poll_interval_s=0.05,
        rate_limit="1000000/minute",
        submit_rate_limit="1000000/minute",
        max_queued_jobs_per_user=100000,
        max_requests_in_flight=100000,
    )
    app = create_app(settings)
    results: dict[str, Any] = {
        "pipeline_instances": args.pipeline_instances,
        "clients": args.clients,
        "switches": args.switches,
    }
    try:
        async with app.router.lifespan_context(app):
            services = app.state.services
            async with services.sessions() as session:
                user = await accounts.create_user(session=session, name="root", role="admin")
                _, key = await accounts.create_key(session=session, user_id=user.id)
            headers = {"Authorization": f"Bearer {key}"}
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://bench", timeout=600
            )

            # Publish version 2 (and 3, for the delete).
            async def publish(version: int) -> dict[str, float]:
                t0 = time.perf_counter()
                exported = await asyncio.to_thread(
                    export_version, DEMO, repository=repository, model="sfumato-shapes"
                )
                assert exported.version == version
                export_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                async with services.sessions() as session:
                    entry = await registry.publish_version(
                        session=session,
                        triton=services.triton,
                        model="sfumato-shapes",
                        exported=exported,
                        lineage={"bench": True},
                        deploy=False,
                    )
                publish_s = time.perf_counter() - t0
                return {
                    "export_s": export_s,
                    "publish_s": publish_s,
                    "load_s": entry.lineage["load_s"],
                    "validation_s": entry.validation[0]["elapsed_s"],
                }

            results["publish"] = await publish(2)
            print(f"publish v2: {results['publish']}", file=sys.stderr)

            # Deploy / rollback under steady traffic.
            latencies: list[tuple[float, float, int, str]] = []  # (start, seconds, HTTP, version)
            stop = asyncio.Event()

            async def traffic() -> None:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    r = await client.post(
                        "/v1/generations", json=REQUEST, headers={**headers, "Prefer": "wait=300"}
                    )
                    body = r.json()
                    ok = r.status_code == 200 and body.get("status") == "succeeded"
                    latencies.append(
                        (
                            t0,
                            time.perf_counter() - t0,
                            200 if ok else r.status_code,
                            body.get("model", {}).get("version", ""),
                        )
                    )

            clients = [asyncio.create_task(traffic()) for _ in range(args.clients)]
            await asyncio.sleep(args.warmup_s)
            baseline_from = time.perf_counter()
            await asyncio.sleep(args.baseline_s)
            switches: list[dict[str, Any]] = []
            switch_from = time.perf_counter()
            for i in range(args.switches):
                for kind, path in (
                    ("deploy", "/v1/models/sfumato-shapes/versions/2/deploy"),
                    ("rollback", "/v1/models/sfumato-shapes/rollback"),
                ):
                    t0 = time.perf_counter()
                    r = await client.post(path, headers=headers)
                    elapsed = time.perf_counter() - t0
                    assert r.status_code == 200, r.text
                    switches.append({"kind": kind, "s": elapsed, "version": r.json()["version"], "round": i})
                    await asyncio.sleep(args.gap_s)
            switch_to = time.perf_counter()
            stop.set()
            await asyncio.gather(*clients)

            def window(start: float, end: float) -> list[tuple[float, float, int, str]]:
                return [x for x in latencies if start <= x[0] < end]

            before, during = window(baseline_from, switch_from), window(switch_from, switch_to)
            results["switches"] = switches
            for kind in ("deploy", "rollback"):
                times = [s["s"] for s in switches if s["kind"] == kind]
                results[kind] = {"p50_s": statistics.median(times), "max_s": max(times), "n": len(times)}
            results["traffic"] = {
                name: {
                    "requests": len(rows),
                    "failed": sum(1 for r in rows if r[2] != 200),
                    "p50_s": pct([r[1] for r in rows], 50),
                    "p95_s": pct([r[1] for r in rows], 95),
                    "versions": sorted({r[3] for r in rows}),
                }
                for name, rows in (("before", before), ("during_switches", during))
            }
            results["failed_requests_total"] = sum(1 for r in latencies if r[2] != 200)

            # Delete an undeployed version.
            results["publish_v3"] = await publish(3)
            t0 = time.perf_counter()
            r = await client.delete("/v1/models/sfumato-shapes/versions/3", headers=headers)
            assert r.status_code == 204, r.text
            results["delete"] = {"s": time.perf_counter() - t0}
            await client.aclose()
    finally:
        server.stop()
    return results


def report(results: dict[str, Any]) -> None:
    p = results["publish"]
    rows = [
        ("export_version (ONNX + parity)", p["export_s"]),
        ("publish: Triton load of v2", p["load_s"]),
        ("publish: validation prompt", p["validation_s"]),
        ("publish total", p["publish_s"]),
        ("deploy (p50)", results["deploy"]["p50_s"]),
        ("deploy (max)", results["deploy"]["max_s"]),
        ("rollback (p50)", results["rollback"]["p50_s"]),
        ("rollback (max)", results["rollback"]["max_s"]),
        ("delete v3 (unload + reload)", results["delete"]["s"]),
    ]
    print(f"\n{'step':<34} {'seconds':>9}")
    for name, value in rows:
        print(f"{name:<34} {value:>9.3f}")
    print(f"\n{'traffic':<18} {'requests':>8} {'failed':>7} {'p50 s':>7} {'p95 s':>7}  versions")
    for name, t in results["traffic"].items():
        counts = f"{t['requests']:>8} {t['failed']:>7}"
        print(f"{name:<18} {counts} {t['p50_s']:>7.3f} {t['p95_s']:>7.3f}  {t['versions']}")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = results["publish"]
    names = ["export", "load v2", "validate", "deploy p50", "rollback p50", "delete"]
    values = [
        p["export_s"],
        p["load_s"],
        p["validation_s"],
        results["deploy"]["p50_s"],
        results["rollback"]["p50_s"],
        results["delete"]["s"],
    ]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, values, color=["#888", "#888", "#888", "#2a7", "#27a", "#a52"])
    ax.set_yscale("log")
    ax.set_ylabel("seconds (log)")
    t = results["traffic"]
    ax.set_title(
        f"registry: deploy/rollback under traffic, {t['during_switches']['requests']} requests, "
        f"{results['failed_requests_total']} failed"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline-instances", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--switches", type=int, default=5, help="deploy + rollback rounds")
    parser.add_argument("--gap-s", type=float, default=1.0, help="pause after each switch")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--baseline-s", type=float, default=10.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sfumato-bench-registry-") as tmp:
        results = asyncio.run(run(args, Path(tmp)))
    report(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "registry.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "registry.png")
    print(f"\nsaved {RESULTS / 'registry.json'} and registry.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
