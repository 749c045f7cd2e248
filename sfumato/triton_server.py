"""Run the real ``tritonserver`` that ships inside the ``nvidia-pytriton`` wheel.

The wheel carries Triton 2.51 with the python backend and a python-backend stub per Python
version. Triton looks for the stub in the backend directory, so we lay out a backend directory
of our own (``<work_dir>/backends/python``: the backend library, its utils module, and the stub
for the running Python) instead of touching site-packages. The stub then runs in this
virtualenv, so python-backend models see its packages (ONNX Runtime, tokenizers, numpy).

``TritonServer`` starts the process with explicit model control and every model of the
repository loaded, waits until Triton says it is ready, and stops it gracefully (SIGTERM, then
Triton's own ``--exit-timeout-secs``).

Locked down by default: HTTP, gRPC and metrics listen on 127.0.0.1 unless ``address`` says
otherwise, and the protocol groups that change or reveal the server (model repository, model
config, shared memory, trace, logging) answer only calls that carry the header
``sfumato-admin-key`` with the installation's secret (Triton's ``--grpc-restricted-protocol`` /
``--http-restricted-api``). Triton runs under :mod:`sfumato.process_guard`: it and its
python-backend stubs die with the process that started it, SIGKILL included.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sfumato import process_guard
from sfumato.errors import MissingDependencyError, SfumatoError, UsageError

#: The header that Triton's restricted protocols demand, as configured (the HTTP header's name).
ADMIN_KEY_HEADER = "sfumato-admin-key"
#: Over gRPC, Triton 2.51 expects the configured key with its own prefix as the metadata key.
ADMIN_KEY_GRPC_METADATA = f"triton-grpc-protocol-{ADMIN_KEY_HEADER}"
#: Protocol groups that only the control plane may use (with the header above).
RESTRICTED_GROUPS = ("model-repository", "model-config", "shared-memory", "trace", "logging")


_log = logging.getLogger(__name__)


class TritonStartError(SfumatoError):
    """Triton did not become ready: a model failed to load, a port was busy, or it crashed."""


class TritonCrashedError(TritonStartError):
    """Triton died of a signal while starting (an abort or a segfault, not an error it reported)."""


# Exit statuses of a crash, as Popen reports them (-signal) and as the process guard reports a
# child killed by a signal (128 + signal). Triton 2.51's python backend can abort while it
# launches its stubs on a starved machine (boost::interprocess::lock_exception, an upstream
# race); a new start of the same command comes up.
CRASH_SIGNALS = (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS)
CRASH_CODES = frozenset({-int(s) for s in CRASH_SIGNALS} | {128 + int(s) for s in CRASH_SIGNALS})


@dataclass(frozen=True, slots=True)
class TritonDistribution:
    binary: Path
    libs: Path
    python_backend: Path
    stub: Path


def find_distribution() -> TritonDistribution:
    """Locate the tritonserver binary, its libraries and the stub for this Python."""
    try:
        import pytriton
    except ImportError as exc:
        raise MissingDependencyError(
            "the tritonserver binary comes with the 'nvidia-pytriton' package: pip install 'sfumato[serving]'"
        ) from exc
    root = Path(pytriton.__file__).parent
    dist = root / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    libs = root / "tritonserver" / "external_libs"
    if not libs.is_dir():
        libs = root.parent / "nvidia_pytriton.libs"
    found = TritonDistribution(
        binary=dist / "bin" / "tritonserver",
        libs=libs,
        python_backend=dist / "backends" / "python",
        stub=dist / "python_backend_stubs" / version / "triton_python_backend_stub",
    )
    if not found.binary.is_file():
        raise MissingDependencyError(f"no tritonserver binary at {found.binary}; reinstall nvidia-pytriton")
    if not found.stub.is_file():
        raise MissingDependencyError(f"nvidia-pytriton ships no python backend stub for Python {version}")
    return found


def prepare_backend_dir(work_dir: Path, dist: TritonDistribution | None = None) -> Path:
    """``<work_dir>/backends`` with the python backend and this Python's stub; returns it."""
    dist = dist or find_distribution()
    backends = Path(work_dir) / "backends"
    target = backends / "python"
    target.mkdir(parents=True, exist_ok=True)
    for source in [*dist.python_backend.iterdir(), dist.stub]:
        if source.is_file():
            dest = target / source.name
            if not dest.exists() or dest.stat().st_size != source.stat().st_size:
                shutil.copy2(source, dest)
    return backends


def repository_models(repository: Path) -> list[str]:
    """Names of the models in a repository: folders holding a ``config.pbtxt``."""
    repository = Path(repository)
    if not repository.is_dir():
        raise UsageError(f"model repository {repository} does not exist; run 'make model' first")
    names = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    if not names:
        raise UsageError(f"model repository {repository} holds no models (no */config.pbtxt)")
    return names


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def connect_host(address: str) -> str:
    """The host to connect to for a listener bound to ``address`` (a wildcard means loopback)."""
    return "127.0.0.1" if address in {"0.0.0.0", "", "::", "[::]"} else address


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_LOAD_FAILURE = re.compile(r"failed to load '([^']+)'[^:]*: (.*)")


@dataclass(slots=True)
class TritonServer:
    """One ``tritonserver`` process serving a model repository."""

    repository: Path
    work_dir: Path
    admin_key: str  # value of the sfumato-admin-key header the restricted protocols demand
    address: str = "127.0.0.1"  # where HTTP, gRPC and metrics listen
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    exit_timeout_secs: int = 30
    models: list[str] | None = None  # None: every model in the repository
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def grpc_url(self) -> str:
        return f"{connect_host(self.address)}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{connect_host(self.address)}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{connect_host(self.address)}:{self.metrics_port}/metrics"

    def command(self, dist: TritonDistribution, backends: Path) -> list[str]:
        models = self.models if self.models is not None else repository_models(self.repository)
        if not self.admin_key or any(c.isspace() or c in ",:=" for c in self.admin_key):
            raise UsageError("the Triton admin key must be non-empty, without spaces, ',', ':' or '='")
        restricted = f"{','.join(RESTRICTED_GROUPS)}:{ADMIN_KEY_HEADER}={self.admin_key}"
        args = [
            str(dist.binary),
            f"--model-repository={Path(self.repository).resolve()}",
            f"--backend-directory={backends.resolve()}",
            f"--http-address={self.address}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.address}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.address}",
            f"--metrics-port={self.metrics_port}",
            # Triton 2.51: <groups>:<header>=<value>. The value is on the command line (Triton has
            # no file option), readable by local users through /proc: see the README.
            f"--grpc-restricted-protocol={restricted}",
            f"--http-restricted-api={restricted}",
            "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in models),
            f"--exit-timeout-secs={self.exit_timeout_secs}",
            "--strict-readiness=true",
            "--log-verbose=0",
        ]
        return args

    def start(
        self, *, timeout: float = 180.0, cancel: threading.Event | None = None, crash_retries: int = 2
    ) -> None:
        """Start Triton (under a process guard) and wait until it is ready; ``cancel`` set while
        waiting stops it and raises :class:`TritonStartError`. A Triton that crashes while it
        starts (:data:`CRASH_CODES`) is started again, up to ``crash_retries`` times, each crash's
        log kept beside the new one (``tritonserver-<port>.crash<N>.log``)."""
        for attempt in range(crash_retries + 1):
            self._launch()
            try:
                self.wait_ready(timeout=timeout, cancel=cancel)
                return
            except TritonCrashedError as exc:
                if attempt == crash_retries:
                    raise
                assert self.process is not None and self.log_path is not None
                process_guard.stop(self.process, timeout=10)  # its stubs too, and the ports free
                kept = self.log_path.with_suffix(f".crash{attempt + 1}.log")
                self.log_path.replace(kept)
                _log.warning("%s; starting it again (log of the crash: %s)", exc, kept)

    def _launch(self) -> None:
        dist = find_distribution()
        for label, port in (
            ("HTTP", self.http_port),
            ("gRPC", self.grpc_port),
            ("metrics", self.metrics_port),
        ):
            if not port_is_free(port, self.address or "0.0.0.0"):
                raise TritonStartError(f"Triton {label} port {port} is already in use")
        backends = prepare_backend_dir(self.work_dir, dist)
        env = os.environ.copy()
        env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(dist.libs), env.get("LD_LIBRARY_PATH")]))
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = Path(self.work_dir) / f"tritonserver-{self.grpc_port}.log"
        log = self.log_path.open("wb")
        try:
            self.process = process_guard.start(
                self.command(dist, backends), stdout=log, stderr=subprocess.STDOUT, env=env
            )
        finally:
            log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def failure_summary(self) -> str:
        text = self.log_text()
        failures = [f"{m.group(1)}: {m.group(2).strip()}" for m in _LOAD_FAILURE.finditer(text)]
        if failures:
            return "model failed to load: " + "; ".join(dict.fromkeys(failures))
        errors = [line for line in text.splitlines() if line.startswith("E")]
        return errors[-1] if errors else f"see {self.log_path}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, *, timeout: float, cancel: threading.Event | None = None) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cancel is not None and cancel.is_set():
                self.stop()
                raise TritonStartError("start of tritonserver cancelled")
            if self.process.poll() is not None:
                error = TritonCrashedError if self.process.returncode in CRASH_CODES else TritonStartError
                raise error(
                    f"tritonserver exited with code {self.process.returncode}: {self.failure_summary()}"
                )
            if self.ready():
                return
            time.sleep(0.25)
        self.stop()
        raise TritonStartError(f"tritonserver not ready after {timeout:.0f} s: {self.failure_summary()}")

    def stop(self, *, timeout: float | None = None) -> int | None:
        """SIGTERM, wait for Triton's own graceful exit, then SIGKILL of its whole process group
        (server and stubs) as a last resort. Returns Triton's exit code."""
        if self.process is None:
            return None
        return process_guard.stop(self.process, timeout=timeout or self.exit_timeout_secs + 10)
