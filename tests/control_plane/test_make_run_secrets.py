"""``make run``'s path end to end: ``sfumato up`` started the way the Makefile starts it (no
``SFUMATO_*`` settings but the data dir, so production mode and a generated signing key) with
the real Triton. A token forged with the public development key is refused; a token signed with
the installation's own key (generated under ``<data_dir>/secrets``, mode 0600) is accepted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import jwt
import pytest

from sfumato.control_plane.settings import DEVELOPMENT_SECRET
from sfumato.triton_server import free_port

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_make_run_refuses_a_token_forged_with_the_development_key(
    exported_repo: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFUMATO_")}
    env["SFUMATO_DATA_DIR"] = str(tmp_path / "var")
    port = free_port()
    out = tmp_path / "up.log"
    command = [
        BIN / "sfumato",
        "up",
        "--model-repository",
        str(exported_repo),
        "--port",
        str(port),
        "--triton-http-port",
        str(free_port()),
        "--triton-grpc-port",
        str(free_port()),
        "--triton-metrics-port",
        str(free_port()),
    ]
    with out.open("wb") as log:
        up = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # Triton starts first; on a loaded machine that takes a while
        while True:
            assert up.poll() is None, out.read_text()[-5000:]
            try:
                if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, out.read_text()[-5000:]
            time.sleep(0.5)
        key = re.search(r"sfm_[a-z0-9]{12}_[A-Za-z0-9_-]{43}", out.read_text())
        assert key, out.read_text()
        admin = {"Authorization": f"Bearer {key.group(0)}"}
        admin_id = httpx.get(f"{base}/v1/keys", headers=admin, timeout=30).json()[0]["user_id"]

        secret_file = tmp_path / "var" / "secrets" / "jwt-signing-key"
        assert secret_file.stat().st_mode & 0o777 == 0o600
        installation_key = secret_file.read_text().strip()
        assert installation_key != DEVELOPMENT_SECRET and len(installation_key) >= 32
        now = datetime.now(UTC)
        claims = {
            "sub": admin_id,
            "role": "admin",
            "aud": "sfumato",
            "iss": "sfumato",
            "iat": now,
            "exp": now + timedelta(minutes=5),
        }
        forged = jwt.encode(claims, DEVELOPMENT_SECRET, algorithm="HS256")
        r = httpx.get(f"{base}/v1/users", headers={"Authorization": f"Bearer {forged}"}, timeout=30)
        assert r.status_code == 401, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        # The control: the same claims signed with this installation's key are accepted.
        genuine = jwt.encode(claims, installation_key, algorithm="HS256")
        r = httpx.get(f"{base}/v1/users", headers={"Authorization": f"Bearer {genuine}"}, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(timeout=30)
