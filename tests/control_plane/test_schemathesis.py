"""Property-based API testing with schemathesis against the real server and its OpenAPI document.

``sfumato serve`` runs as a subprocess on each database; schemathesis generates requests from
``/openapi.json`` (examples, boundary values, fuzzed bodies, stateful links) with an admin key
and fails on any server error (5xx) or a response that does not match the documented schema.
Triton is not running, so ``/readyz`` answers its documented 503.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx

from sfumato.triton_server import free_port

BIN = Path(sys.executable).parent


async def test_schemathesis_finds_no_server_errors(database_url: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "SFUMATO_ENV": "test",
        "SFUMATO_SECRET_KEY": secrets.token_urlsafe(48),
        "SFUMATO_DATABASE_URL": database_url,
        "SFUMATO_DATA_DIR": str(tmp_path),
        "SFUMATO_WORKERS": "0",
        "SFUMATO_TRITON_URL": "127.0.0.1:1",
        "SFUMATO_RATE_LIMIT": "1000000/minute",
        "SFUMATO_SUBMIT_RATE_LIMIT": "1000000/minute",
        "SFUMATO_JOB_READ_RATE_LIMIT": "1000000/minute",
        "SFUMATO_AUTH_FAILURE_RATE_LIMIT": "1000000/minute",
        "SFUMATO_LOGIN_RATE_LIMIT": "1000000/minute",
        "SFUMATO_LOGIN_ADDRESS_RATE_LIMIT": "1000000/minute",
        "SFUMATO_MAX_QUEUED_JOBS_PER_USER": "1000000",
    }
    key = subprocess.run(
        [BIN / "sfumato", "admin", "create-key", "--user", "fuzzer", "--role", "admin"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [BIN / "sfumato", "serve", "--port", str(port), "--no-migrate", "--log-level", "warning"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(150):
                try:
                    if (await client.get(f"{base}/healthz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    await asyncio.sleep(0.2)
        report = tmp_path / "schemathesis.json"
        run = await asyncio.to_thread(
            subprocess.run,
            [
                BIN / "schemathesis",
                "run",
                f"{base}/openapi.json",
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,"
                "response_schema_conformance",
                "--header",
                f"Authorization: Bearer {key}",
                "--max-examples",
                "15",
                "--seed",
                "1",
                "--workers",
                "1",
                "--report",
                "ndjson",
                "--report-ndjson-path",
                str(report),
                "--warnings",
                "off",
                # Without a Triton, /readyz and the admin model routes answer their documented 503;
                # they are tested against a real Triton in test_operations and test_end_to_end.
                "--exclude-path",
                "/readyz",
                "--exclude-path-regex",
                "^/v1/(models|triton)",
                # An event stream of a real job lasts until the job finishes (no worker here):
                # its routes are tested in test_events (SSE, WebSocket, resume, 404 / 4404).
                "--exclude-path",
                "/v1/generations/{job_id}/events",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,  # schemathesis keeps its state in ./.schemathesis
        )
        print(run.stdout[-1500:])
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        events = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
        generated = [line for line in run.stdout.splitlines() if " generated, " in line]
        assert events and generated, "schemathesis ran no test case"
        print(f"schemathesis on {database_url.split(':')[0]}: {generated[-1].strip()}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    assert b"Traceback" not in (tmp_path / "serve.log").read_bytes()
