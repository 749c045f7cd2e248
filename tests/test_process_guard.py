"""The process guard and the supervisor on plain processes (``sleep``, ``sh``): what they promise
without Triton's start-up time. Triton itself is covered in test_supervision.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from sfumato import process_guard
from sfumato.supervisor import Supervisor


def wait_for(condition, *, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def group_members(pgid: int) -> set[int]:
    return set(process_guard.leftovers(pgid=pgid, parent=-1))


def test_the_whole_group_dies_when_the_starter_is_killed(tmp_path: Path) -> None:
    """A starter SIGKILLed: the guard kills the command and what the command forked."""
    pids = tmp_path / "pids"
    starter = textwrap.dedent(
        f"""
        import sys, time
        from sfumato import process_guard
        guard = process_guard.start(["sh", "-c", "sleep 1000 & echo $$ $! > {pids}; wait"])
        print(guard.pid, flush=True)
        time.sleep(1000)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    guard = int(process.stdout.readline())
    wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2, timeout=30, what="the command")
    shell, grandchild = map(int, pids.read_text().split())
    assert {guard, shell, grandchild} <= group_members(guard)

    process.kill()
    process.wait()
    wait_for(lambda: not (alive(guard) or alive(shell) or alive(grandchild)), timeout=30, what="the group")


def test_a_graceful_stop_reaches_the_command_and_the_group_goes(tmp_path: Path) -> None:
    marker = tmp_path / "got-term"
    script = f"trap 'echo term > {marker}; exit 0' TERM; sleep 1000 & wait"
    guard = process_guard.start(["sh", "-c", script])
    wait_for(lambda: len(group_members(guard.pid)) >= 3, timeout=30, what="sh and sleep")
    members = group_members(guard.pid)
    assert process_guard.stop(guard, timeout=30) == 0
    assert marker.read_text().strip() == "term"
    assert not any(alive(pid) for pid in members)


def test_a_guard_started_from_a_thread_outlives_that_thread(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG fires when the starting thread ends (asyncio.to_thread, a supervisor's
    restart): the guard must live on while the process that started it does."""
    marker = tmp_path / "got-term"
    script = f"trap 'echo term > {marker}; exit 0' TERM; sleep 1000 & wait"
    started: list[subprocess.Popen] = []
    release = threading.Event()

    def starter() -> None:
        started.append(process_guard.start(["sh", "-c", script]))
        release.wait(timeout=120)

    thread = threading.Thread(target=starter)
    thread.start()
    wait_for(
        lambda: bool(started) and len(group_members(started[0].pid)) >= 3, timeout=30, what="sh and sleep"
    )
    release.set()
    thread.join(timeout=30)  # the kernel sends the guard SIGHUP now, before the SIGTERM below
    assert not thread.is_alive()
    # A guard that took the thread's end for its parent's death would have SIGKILLed sh (137).
    assert process_guard.stop(started[0], timeout=30) == 0
    assert marker.read_text().strip() == "term"


def test_the_exit_code_is_the_commands() -> None:
    assert process_guard.start(["sh", "-c", "exit 3"]).wait(timeout=30) == 3
    guard = process_guard.start(["sh", "-c", "kill -9 $$"])
    assert guard.wait(timeout=30) == 128 + signal.SIGKILL


def test_a_stop_at_once_after_the_start_is_still_graceful() -> None:
    """SIGTERM before the guard has its handlers: held pending, then handled (not a kill)."""
    for _ in range(5):
        guard = process_guard.start(["sleep", "1000"])
        code = process_guard.stop(guard, timeout=30)
        assert code in (0, 128 + signal.SIGTERM), code  # not started yet, or its sleep got SIGTERM
        assert not group_members(guard.pid)


def command_of(guard: subprocess.Popen) -> int:
    """The pid of the command a guard runs (its one child)."""
    children: list[str] = []

    def started() -> bool:
        children[:] = Path(f"/proc/{guard.pid}/task/{guard.pid}/children").read_text().split()
        return bool(children)

    wait_for(started, timeout=30, what="the guard's command")
    return int(children[0])


class SleepServer:
    """A real process under the guard, shaped like TritonServer for the supervisor."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self, *, timeout: float, cancel: threading.Event | None = None) -> None:
        self.starts += 1
        self.process = process_guard.start(["sleep", "1000"])

    def stop(self) -> int | None:
        return None if self.process is None else process_guard.stop(self.process, timeout=30)

    def failure_summary(self) -> str:
        return "killed by the test"


def test_the_supervisor_restarts_counts_and_stops_for_good() -> None:
    server = SleepServer()
    states: list[bool] = []
    restarts: list[int] = []
    supervisor = Supervisor(
        server,
        name="sleep",
        initial_backoff_s=0.05,
        max_backoff_s=0.2,
        on_up=states.append,
        on_restart=lambda: restarts.append(1),
    )
    supervisor.start()
    for expected in (1, 2):
        assert server.process is not None
        os.kill(command_of(server.process), signal.SIGKILL)  # the command dies; its guard follows
        wait_for(lambda n=expected: len(restarts) == n, timeout=30, what=f"restart {expected}")
    assert supervisor.restarts == 2 and server.starts == 3
    assert states[0] is True and False in states and states[-1] is True
    current = server.process
    assert current is not None and current.poll() is None

    supervisor.stop()
    assert current.poll() is not None  # stopped
    assert supervisor._thread is not None and not supervisor._thread.is_alive()
    assert server.starts == 3 and states[-1] is False  # and not restarted


def test_no_restart_begins_once_stopping() -> None:
    server = SleepServer()
    supervisor = Supervisor(server, name="sleep", initial_backoff_s=30.0)
    supervisor.start()
    assert server.process is not None
    os.kill(command_of(server.process), signal.SIGKILL)
    wait_for(lambda: server.process.poll() is not None, timeout=30, what="the exit")
    supervisor.stop()  # during the 30 s backoff: returns at once, no new start
    assert server.starts == 1 and supervisor.restarts == 0
