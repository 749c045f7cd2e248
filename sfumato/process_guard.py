"""Run a command so that it, and every process it starts, dies with the process that asked.

``python -m sfumato.process_guard --parent PID -- COMMAND ...`` is how Sfumato starts
``tritonserver`` and the gRPC edge's proxy. The guard is a small single-threaded process that:

* leads a process group of its own (the caller starts it with ``start_new_session``); the
  command and everything the command forks (Triton's python-backend stubs) stay in that group;
* asks the kernel for ``SIGHUP`` when its parent dies, by any death, SIGKILL included
  (``PR_SET_PDEATHSIG``), and checks right after that the parent is still the one that started it;
  the kernel also sends it when only the starting *thread* ends, which the guard ignores while
  the parent process is still its parent;
* is a child subreaper (``PR_SET_CHILD_SUBREAPER``): a stub orphaned by a crashed Triton is
  re-parented to the guard, not to init;
* gives the command ``PR_SET_PDEATHSIG = SIGKILL`` too (set between fork and exec: safe here, the
  guard has a single thread), so a SIGKILL of the guard itself still takes the command down.

``SIGTERM`` / ``SIGINT`` to the guard are passed to the command (a graceful stop). When the command
exits, for whatever reason, or the parent died, the guard SIGKILLs every process left in its group
and every orphan re-parented to it, waits until they are gone, and exits with the command's code
(``128 + signal`` when it was killed by a signal). Nothing the command started outlives the guard.

Linux only (prctl); elsewhere the guard still runs the command and kills its group on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
GUARDED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def _prctl(option: int, value: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}, {value}) failed")


def _die_with_parent() -> None:
    """In the command's process, between fork and exec: SIGKILL when the guard dies."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    return raw[raw.rindex(")") + 2 :].split()


def leftovers(*, pgid: int, parent: int) -> list[int]:
    """Live processes (zombies excluded) in process group ``pgid`` or whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == parent:
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None or fields[0] == "Z":
            continue
        if int(fields[2]) == pgid or int(fields[1]) == parent:
            found.append(int(entry.name))
    return found


def _reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_leftovers(*, timeout: float = 30.0) -> None:
    """SIGKILL every other process of our group and every orphan re-parented to us; wait until
    they are gone (zombies reaped)."""
    me = os.getpid()
    pgid = os.getpgid(0)
    deadline = time.monotonic() + timeout
    while True:
        _reap_all()
        pids = [pid for pid in leftovers(pgid=pgid, parent=me) if pid != me]
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def run(command: Sequence[str], *, parent: int) -> int:
    if os.getpgid(0) != os.getpid():
        os.setsid()  # lead a group of our own: kill_leftovers must never reach the caller's group
    state: dict[str, subprocess.Popen | bool | None] = {"child": None, "stop": False, "sent": False}

    def forward(signum: int) -> None:
        child = state["child"]
        if isinstance(child, subprocess.Popen) and not state["sent"]:
            state["sent"] = signum == signal.SIGTERM
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    def graceful(signum: int, _frame: object) -> None:
        state["stop"] = True
        forward(signal.SIGTERM)

    def parent_died(signum: int, _frame: object) -> None:
        # The kernel sends the parent-death signal when the *thread* that started the guard
        # ends: a guard started from a worker thread (asyncio.to_thread, a thread pool) would
        # otherwise die with that thread. The parent process still lives while it is our parent;
        # once it dies we are re-parented (to a subreaper or init), and only then do we stop.
        if os.getppid() == parent:
            return
        state["stop"] = True
        state["sent"] = False
        forward(signal.SIGKILL)

    signal.signal(signal.SIGTERM, graceful)
    signal.signal(signal.SIGINT, graceful)
    signal.signal(signal.SIGHUP, parent_died)
    # start() blocked these signals around our fork: one sent before the handlers above existed
    # is pending, and is handled now instead of killing the guard.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, GUARDED_SIGNALS)
    _prctl(PR_SET_PDEATHSIG, signal.SIGHUP)
    if os.getppid() != parent:  # the parent died before the line above took effect
        return 128 + signal.SIGHUP
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    if state["stop"]:
        return 0  # stopped before the command started
    # preexec_fn is safe here: the guard has a single thread.
    child = subprocess.Popen(list(command), preexec_fn=_die_with_parent)
    state["child"] = child
    if state["stop"]:
        forward(signal.SIGTERM)
    code = child.wait()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    kill_leftovers()
    return 128 - code if code < 0 else code


def start(command: Sequence[str], **popen_kwargs: object) -> subprocess.Popen:
    """Start ``command`` under a guard tied to this process; the ``Popen`` is the guard's."""
    guard = [sys.executable, "-m", "sfumato.process_guard", "--parent", str(os.getpid()), "--"]
    # The guard inherits this mask: a stop sent before its handlers exist waits instead of
    # killing it outright (which would skip the graceful stop).
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, GUARDED_SIGNALS)
    try:
        return subprocess.Popen([*guard, *command], start_new_session=True, **popen_kwargs)  # type: ignore[call-overload]
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def stop(process: subprocess.Popen, *, timeout: float) -> int:
    """SIGTERM (graceful) to a guarded command; SIGKILL to its whole group after ``timeout``."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    return process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sfumato.process_guard", description=__doc__)
    parser.add_argument("--parent", type=int, required=True, help="pid of the process that started us")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    return run(command, parent=args.parent)


if __name__ == "__main__":
    sys.exit(main())
