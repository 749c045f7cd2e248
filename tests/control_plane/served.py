"""``sfumato serve`` as a subprocess on a free port: the real API over real HTTP (uvicorn)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from sfumato.triton_server import free_port

BIN = Path(sys.executable).parent


@dataclass
class Served:
    url: str
    key: str  # an admin API key
    log: Path
    env: dict[str, str] = field(default_factory=dict)  # the server's environment (for a `sfumato worker`)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@contextmanager
def served(database_url: str, data_dir: Path, **env: str) -> Iterator[Served]:
    """The control plane with no workers and no Triton, limits out of the way unless ``env``
    (``SFUMATO_*`` variables) sets them; stopped (SIGTERM) on exit."""
    data_dir.mkdir(parents=True, exist_ok=True)
    environment = {
        **os.environ,
        "SFUMATO_ENV": "test",
        "SFUMATO_SECRET_KEY": secrets.token_urlsafe(48),
        "SFUMATO_DATABASE_URL": database_url,
        "SFUMATO_DATA_DIR": str(data_dir),
        "SFUMATO_WORKERS": "0",
        "SFUMATO_TRITON_URL": "127.0.0.1:1",
        "SFUMATO_RATE_LIMIT": "1000000/minute",
        "SFUMATO_SUBMIT_RATE_LIMIT": "1000000/minute",
        "SFUMATO_JOB_READ_RATE_LIMIT": "1000000/minute",
        "SFUMATO_AUTH_FAILURE_RATE_LIMIT": "1000000/minute",
        "SFUMATO_MAX_QUEUED_JOBS_PER_USER": "1000000",
        **env,
    }
    key = subprocess.run(
        [BIN / "sfumato", "admin", "create-key", "--user", "tester", "--role", "admin"],
        env=environment,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.strip()
    port = free_port()
    log_path = data_dir / "serve.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [BIN / "sfumato", "serve", "--port", str(port), "--no-migrate", "--log-level", "warning"],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert server.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, f"sfumato serve did not start:\n{log_path.read_text()}"
                time.sleep(0.1)
            yield Served(url=url, key=key, log=log_path, env=environment)
        finally:
            server.terminate()
            server.wait(timeout=60)
