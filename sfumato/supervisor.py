"""Keep a server process running: restart it when it exits, with capped exponential backoff.

``Supervisor(server, name=...)`` watches an object shaped like :class:`~sfumato.triton_server.
TritonServer` (``start(timeout=, cancel=)``, ``stop()``, ``process``, ``failure_summary()``),
whose process runs under :mod:`sfumato.process_guard`, so a dead server leaves nothing behind
and the restart finds its ports free. One thread per supervisor; ``stop()`` sets the stop flag
(no restart can begin after it), stops the server gracefully and joins the thread.

Backoff: ``initial_backoff_s`` after the first exit, doubled after each failed or short-lived
run, capped at ``max_backoff_s``; a run that stayed up ``stable_after_s`` resets it. The hooks
``on_up(bool)`` and ``on_restart()`` feed metrics (``sfumato_triton_up``,
``sfumato_triton_restarts_total``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from sfumato.errors import SfumatoError

log = logging.getLogger("sfumato.supervisor")


class Supervisable(Protocol):
    process: object

    def start(self, *, timeout: float, cancel: threading.Event | None = None) -> None: ...

    def stop(self) -> int | None: ...

    def failure_summary(self) -> str: ...


class Supervisor:
    def __init__(
        self,
        server: Supervisable,
        *,
        name: str,
        ready_timeout_s: float = 300.0,
        initial_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        stable_after_s: float = 60.0,
        on_up: Callable[[bool], None] | None = None,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        self.server = server
        self.name = name
        self.ready_timeout_s = ready_timeout_s
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.stable_after_s = stable_after_s
        self.on_up = on_up or (lambda _up: None)
        self.on_restart = on_restart or (lambda: None)
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the server (raises if it does not become ready), then watch it in a thread."""
        self.server.start(timeout=self.ready_timeout_s, cancel=self._stopping)
        self.on_up(True)
        self._thread = threading.Thread(target=self._watch, name=f"supervise-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """No more restarts; stop the server gracefully and wait for the watcher to end."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        else:
            self.server.stop()
        self.on_up(False)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _exited(self) -> bool:
        process = self.server.process
        return process is None or process.poll() is not None  # type: ignore[attr-defined]

    def _watch(self) -> None:
        backoff = self.initial_backoff_s
        started = time.monotonic()
        try:
            while not self._stopping.is_set():
                if not self._exited():
                    self._stopping.wait(0.2)
                    continue
                self.on_up(False)
                code = getattr(self.server.process, "returncode", None)
                if time.monotonic() - started >= self.stable_after_s:
                    backoff = self.initial_backoff_s
                log.error(
                    "%s exited (code %s): %s; restarting in %.1f s",
                    self.name,
                    code,
                    self.server.failure_summary(),
                    backoff,
                )
                if self._stopping.wait(backoff):
                    break
                delay, backoff = backoff, min(backoff * 2, self.max_backoff_s)
                started = time.monotonic()
                try:
                    self.server.start(timeout=self.ready_timeout_s, cancel=self._stopping)
                except SfumatoError as exc:
                    log.error("%s failed to restart (after %.1f s backoff): %s", self.name, delay, exc)
                    continue
                self.restarts += 1
                self.on_restart()
                self.on_up(True)
                log.warning("%s restarted (restart %d)", self.name, self.restarts)
        finally:
            self.server.stop()
