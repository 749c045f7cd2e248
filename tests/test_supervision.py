"""`sfumato up` supervises Triton: a killed tritonserver is restarted (and counted), and nothing
`sfumato up` started outlives it, SIGKILL included; a new `sfumato up` then starts at once on the
same ports. Real processes, as `make run` starts them (own data dir, free ports)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sfumato.triton_server import free_port

pytestmark = pytest.mark.slow
SERVER_NAMES = {"tritonserver", "triton_python_b", "caddy"}  # comm is cut at 15 characters


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, comm, state) of every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        state, ppid = raw[raw.rindex(")") + 2 :].split()[:2]
        found[int(entry.name)] = (int(ppid), comm, state)
    return found


def descendants(pid: int) -> dict[int, str]:
    """Live (not zombie) descendants of ``pid``: pid -> comm."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for child, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(child)
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if table[child][2] != "Z":
                found[child] = table[child][1]
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    table = _processes()
    return {pid for pid in pids if pid in table and table[pid][2] != "Z"}


def wait_for(condition, *, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


@dataclass
class Up:
    process: subprocess.Popen
    port: int
    triton_ports: tuple[int, int, int]
    edge_port: int
    log: Path

    def ready(self) -> bool:
        return _get(f"http://127.0.0.1:{self.port}/readyz")[0] == 200

    def metric(self, name: str) -> float:
        _, text = _get(f"http://127.0.0.1:{self.port}/metrics")
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))

    def servers(self) -> dict[int, str]:
        return {pid: comm for pid, comm in descendants(self.process.pid).items() if comm in SERVER_NAMES}


@pytest.fixture
def start_up(tmp_path: Path, exported_repo: Path) -> Iterator:
    started: list[Up] = []
    ports = {"port": free_port(), "triton": (free_port(), free_port(), free_port()), "edge": free_port()}

    def start() -> Up:
        log = tmp_path / f"up-{len(started)}.log"
        env = {
            **os.environ,
            "SFUMATO_DATA_DIR": str(tmp_path / "data"),
            "SFUMATO_WORKERS": "0",
        }
        http, grpc, metrics = ports["triton"]
        command = [
            *(sys.executable, "-m", "sfumato.cli", "up", "--model-repository", str(exported_repo)),
            *("--port", str(ports["port"]), "--triton-http-port", str(http)),
            *("--triton-grpc-port", str(grpc), "--triton-metrics-port", str(metrics)),
            *("--edge-port", str(ports["edge"])),
        ]
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        up = Up(process, ports["port"], ports["triton"], ports["edge"], log)
        started.append(up)
        wait_for(
            lambda: up.ready() or process.poll() is not None, timeout=300, what="`sfumato up` to be ready"
        )
        assert process.poll() is None, f"`sfumato up` exited:\n{log.read_text()[-3000:]}"
        return up

    yield start
    for up in started:  # a failed test must not leave servers behind
        leftover = set(up.servers())
        if up.process.poll() is None:
            up.process.kill()
        for pid in alive(leftover):
            os.kill(pid, signal.SIGKILL)


def test_a_killed_triton_is_restarted_and_counted(start_up) -> None:
    up = start_up()
    assert up.metric("sfumato_triton_up") == 1.0
    assert up.metric("sfumato_triton_restarts_total") == 0.0
    before = up.servers()
    [triton] = [pid for pid, comm in before.items() if comm == "tritonserver"]
    stubs = {pid for pid, comm in before.items() if comm == "triton_python_b"}
    assert len(stubs) >= 5, before

    os.kill(triton, signal.SIGKILL)
    wait_for(lambda: not alive(stubs | {triton}), timeout=60, what="the old stubs to be gone")
    wait_for(lambda: up.metric("sfumato_triton_restarts_total") == 1.0, timeout=300, what="a restart")
    wait_for(up.ready, timeout=60, what="readiness after the restart")
    assert up.metric("sfumato_triton_up") == 1.0
    after = up.servers()
    assert [comm for comm in after.values() if comm == "tritonserver"] == ["tritonserver"]
    assert triton not in after and not stubs & set(after)
    assert "restarting in" in up.log.read_text()

    servers = set(after)
    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(timeout=120) == 0, up.log.read_text()[-3000:]
    assert not alive(servers), "servers outlived a graceful stop"


def test_sigkill_of_up_leaves_nothing_and_up_starts_again_at_once(start_up) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    first = start_up()
    # `sfumato up` serves the gRPC edge too: the admin key it printed passes, nothing else does.
    key = re.search(r"^\s+(sfm_\S+)$", first.log.read_text(), re.MULTILINE)
    assert key, first.log.read_text()
    edge = grpcclient.InferenceServerClient(f"127.0.0.1:{first.edge_port}")
    assert edge.is_model_ready("pipeline", headers={"authorization": f"Bearer {key.group(1)}"})
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
        edge.is_model_ready("pipeline")
    servers = first.servers()
    assert {"tritonserver", "triton_python_b", "caddy"} <= set(servers.values()), servers
    everything = set(descendants(first.process.pid))

    first.process.kill()
    first.process.wait()
    wait_for(lambda: not alive(everything), timeout=60, what="every process of `sfumato up` to be gone")

    second = start_up()  # same ports, same data dir: nothing holds them
    assert second.ready()
    assert "already in use" not in second.log.read_text()
    servers = set(second.servers())
    second.process.send_signal(signal.SIGINT)
    assert second.process.wait(timeout=120) == 0, second.log.read_text()[-3000:]
    assert not alive(servers)
