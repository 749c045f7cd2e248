"""`sfumato triton serve`'s launcher: clear failures for the usual mistakes."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from sfumato.errors import UsageError
from sfumato.triton_server import (
    TritonCrashedError,
    TritonServer,
    TritonStartError,
    free_port,
    prepare_backend_dir,
    repository_models,
)


def _server(repo: Path, work: Path, **kwargs) -> TritonServer:
    return TritonServer(
        repository=repo,
        work_dir=work,
        admin_key="test-admin-key-0123456789abcdefghijklmnop",
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        **kwargs,
    )


def test_backend_dir_holds_the_stub_for_this_python(tmp_path: Path) -> None:
    backends = prepare_backend_dir(tmp_path)
    names = {p.name for p in (backends / "python").iterdir()}
    assert {"libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"} <= names


def test_missing_or_empty_repository(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        repository_models(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="holds no models"):
        repository_models(tmp_path)


def test_busy_port_is_named(tmp_path: Path, exported_repo: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = _server(exported_repo, tmp_path)
        server.grpc_port = busy.getsockname()[1]
        with pytest.raises(TritonStartError, match=f"gRPC port {server.grpc_port} is already in use"):
            server.start()


def test_a_model_that_fails_to_load_is_named(tmp_path: Path, exported_repo: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(exported_repo / "text_encoder", repo / "text_encoder")
    (repo / "text_encoder" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    server = _server(repo, tmp_path / "work")
    with pytest.raises(TritonStartError, match="text_encoder"):
        server.start(timeout=120)
    assert server.process is not None and server.process.poll() is not None


def test_a_triton_that_crashes_while_starting_is_started_again(
    tmp_path: Path, exported_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Triton 2.51's python backend can abort while launching its stubs on a starved machine
    (boost::interprocess::lock_exception): the start is tried again, the crash's log kept. The
    first launch here dies of SIGABRT at once; the second is the real tritonserver."""
    real = TritonServer.command
    launches = []

    def command(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        launches.append(len(launches))
        if len(launches) == 1:
            return ["sh", "-c", "echo 'terminate called (a crash while starting)'; kill -ABRT $$"]
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TritonServer, "command", command)
    server = _server(exported_repo, tmp_path, models=["text_encoder"])
    server.start(timeout=120)
    try:
        assert server.ready() and len(launches) == 2
        (crash_log,) = tmp_path.glob("tritonserver-*.crash1.log")
        assert "a crash while starting" in crash_log.read_text()
    finally:
        assert server.stop() == 0


def test_a_triton_that_keeps_crashing_is_an_error(
    tmp_path: Path, exported_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(TritonServer, "command", lambda self, *a, **k: ["sh", "-c", "kill -SEGV $$"])
    server = _server(exported_repo, tmp_path)
    with pytest.raises(TritonCrashedError, match="exited with code"):
        server.start(timeout=60, crash_retries=1)
    assert len(list(tmp_path.glob("tritonserver-*.crash*.log"))) == 1
