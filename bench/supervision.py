"""Failure modes of `sfumato up`, measured: SIGKILL of tritonserver, then SIGKILL of `sfumato up`.

Run with ``.venv/bin/python bench/supervision.py``. It exports the demo model (if needed),
starts `sfumato up` on free ports with its own data dir, and measures

* Triton killed: time until the old python-backend stubs are gone, and until `/readyz` is 200
  again (the supervisor's restart, its backoff included);
* `sfumato up` killed: time until none of its processes (tritonserver, stubs, caddy, guards) is
  left, and how long a new `sfumato up` on the same ports takes to be ready.

Printed, and saved as ``bench/results/supervision.json``. Timings on the shared 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from serving import export_repo  # noqa: E402
from test_supervision import alive, descendants  # noqa: E402

from sfumato.triton_server import free_port  # noqa: E402


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def until(condition, timeout: float = 300.0) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise SystemExit("timed out")
        time.sleep(0.05)
    return time.monotonic() - started


def main() -> int:
    work = ROOT / "var" / "bench"
    repo = export_repo(work / "batched", batching=True)
    data = work / f"supervision-{os.getpid()}"
    port, edge = free_port(), free_port()
    http, grpc, metrics = free_port(), free_port(), free_port()
    command = [
        *(sys.executable, "-m", "sfumato.cli", "up", "--model-repository", str(repo)),
        *("--port", str(port), "--edge-port", str(edge), "--triton-http-port", str(http)),
        *("--triton-grpc-port", str(grpc), "--triton-metrics-port", str(metrics)),
    ]
    env = {**os.environ, "SFUMATO_DATA_DIR": str(data), "SFUMATO_WORKERS": "0"}
    log = (data.parent / f"{data.name}.log").open("wb")
    results: dict[str, float | int] = {}

    up = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    results["first_start_to_ready_s"] = until(lambda: ready(port))
    tree = descendants(up.pid)
    triton = next(pid for pid, comm in tree.items() if comm == "tritonserver")
    stubs = {pid for pid, comm in tree.items() if comm == "triton_python_b"}
    results["stubs"] = len(stubs)

    killed = time.monotonic()
    os.kill(triton, signal.SIGKILL)
    results["triton_killed_stubs_gone_s"] = until(lambda: not alive(stubs | {triton}))
    until(lambda: not ready(port), timeout=30)
    until(lambda: ready(port))
    results["triton_killed_ready_again_s"] = time.monotonic() - killed

    everything = set(descendants(up.pid))
    killed = time.monotonic()
    up.kill()
    up.wait()
    results["up_killed_processes_left_after_kill"] = len(alive(everything))
    results["up_killed_all_gone_s"] = until(lambda: not alive(everything))
    results["up_killed_processes_left"] = len(alive(everything))

    again = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    results["up_restarted_ready_s"] = until(lambda: ready(port) or again.poll() is not None)
    results["up_restarted_ok"] = int(again.poll() is None)
    again.send_signal(signal.SIGTERM)
    results["up_sigterm_exit_code"] = again.wait(timeout=120)

    for key, value in results.items():
        print(f"{key:<40} {value:.2f}" if isinstance(value, float) else f"{key:<40} {value}")
    out = ROOT / "bench" / "results" / "supervision.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
