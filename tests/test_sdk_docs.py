"""The SDK's API reference builds from its docstrings (what `make sdk-docs` writes to docs/sdk/)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_sdk_reference_builds(tmp_path: Path) -> None:
    target = re.search(r"^sdk-docs:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert target, "the Makefile has no sdk-docs target"
    command = target.group(1).replace("$(VENV)/bin/pdoc", f"{sys.executable} -m pdoc")
    command = command.replace("-o docs/sdk", f"-o {tmp_path}")
    done = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Warn" not in done.stderr, done.stderr  # every name resolves, every reference links
    page = (tmp_path / "sfumato" / "clients" / "rest.html").read_text()
    for name in ("Client", "AsyncClient", "RetryPolicy", "GenerationError", "Progress"):
        assert f'id="{name}"' in page, name
    for method in ("generate", "submit", "generations", "cancel", "delete", "login", "wait"):
        assert f'id="Client.{method}"' in page, method
    assert "Idempotency-Key" in page and "Retry-After" in page
    assert (tmp_path / "sfumato" / "errors.html").is_file()
