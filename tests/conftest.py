"""Shared fixtures: the committed demo model, one export of it, one real Triton per session."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.triton_exit import assert_stopped_cleanly

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "models" / "sfumato-shapes"

os.environ.setdefault("OMP_NUM_THREADS", "2")
# The session Triton's restricted-protocol key, in the environment as an operator would set it:
# every Settings() of the tests and every `sfumato` subprocess they start finds it
# (SFUMATO_TRITON_ADMIN_KEY); tests of the no-setting path remove it.
os.environ.setdefault("SFUMATO_TRITON_ADMIN_KEY", secrets.token_urlsafe(32))


@pytest.fixture(scope="session")
def demo_model() -> Path:
    assert (DEMO_MODEL / "model_index.json").is_file(), "the committed demo model is missing"
    return DEMO_MODEL


@pytest.fixture(scope="session")
def exported_repo(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    """The demo model exported for the cpu target (what `make model` does), once per session."""
    from sfumato.export.repository import ExportOptions, export_model_repository

    out = tmp_path_factory.mktemp("export") / "model_repository"
    export_model_repository(
        demo_model,
        out,
        ExportOptions(target="cpu", default_guidance=5.0, pipeline_instances=8, stream_instances=4),
    )
    return out


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory, exported_repo: Path) -> Iterator:
    """A real tritonserver on free ports serving the exported demo model, locked down as `sfumato up`
    starts it (loopback; restricted protocols need ``sfumato-admin-key: <server.admin_key>``)."""
    from sfumato.triton_server import TritonServer, free_port

    server = TritonServer(
        repository=exported_repo,
        work_dir=tmp_path_factory.mktemp("triton"),
        admin_key=os.environ["SFUMATO_TRITON_ADMIN_KEY"],
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        # 8 pipeline and 4 pipeline_stream stubs take ~10 s to unload on 2 idle cores, over 30 s
        # at a load average of 20; a model left live fails the stop below (tests/triton_exit.py).
        exit_timeout_secs=60,
    )
    server.start(timeout=300)
    yield server
    assert_stopped_cleanly(server, server.stop())
