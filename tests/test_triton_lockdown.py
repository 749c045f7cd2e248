"""Triton is reachable only by those allowed: loopback listeners, and the dangerous protocol groups
(model repository, model config, shared memory, trace, logging) need the installation's key, over
gRPC and over HTTP. Inference, health and metadata stay open (the edge guards those)."""

from __future__ import annotations

import ipaddress
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from sfumato.clients.triton_grpc import pipeline_inputs
from sfumato.triton_server import (
    ADMIN_KEY_GRPC_METADATA,
    ADMIN_KEY_HEADER,
    TritonServer,
    free_port,
)

RESTRICTED = "This protocol is restricted"


def listening_addresses(port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Local addresses of the TCP sockets in LISTEN state on ``port`` (read from /proc/net)."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for table, size in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            host_hex, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(host_hex)
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, size, 4))
            address = ipaddress.ip_address(raw)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            found.add(address)
    return found


def test_every_listener_is_on_loopback(triton) -> None:
    for port in (triton.http_port, triton.grpc_port, triton.metrics_port):
        addresses = listening_addresses(port)
        assert addresses, f"nothing listens on {port}"
        assert all(a.is_loopback for a in addresses), f"port {port} listens on {addresses}"
        assert ipaddress.ip_address("127.0.0.1") in addresses


def test_address_moves_every_listener(tmp_path: Path, exported_repo: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(exported_repo / "text_encoder", repo / "text_encoder")
    server = TritonServer(
        repository=repo,
        work_dir=tmp_path / "work",
        admin_key="test-admin-key-0123456789abcdefghijklmnop",
        address="127.0.0.2",
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        exit_timeout_secs=10,
    )
    server.start(timeout=180)
    try:
        for port in (server.http_port, server.grpc_port, server.metrics_port):
            assert listening_addresses(port) == {ipaddress.ip_address("127.0.0.2")}
        assert server.grpc_url.startswith("127.0.0.2:")
        assert grpcclient.InferenceServerClient(server.grpc_url).is_server_ready()
    finally:
        assert server.stop() == 0


def test_the_command_line_takes_an_address() -> None:
    from sfumato.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["triton", "serve"]).address == "127.0.0.1"
    assert parser.parse_args(["triton", "serve", "--address", "0.0.0.0"]).address == "0.0.0.0"
    assert parser.parse_args(["up"]).address == "127.0.0.1"
    assert parser.parse_args(["up", "--address", "10.1.2.3"]).address == "10.1.2.3"


# --------------------------------------------------------------------------- gRPC


def _grpc_calls(client: grpcclient.InferenceServerClient) -> dict:
    return {
        "repository index": lambda **kw: client.get_model_repository_index(**kw),
        "model config": lambda **kw: client.get_model_config("pipeline", **kw),
        "trace settings": lambda **kw: client.get_trace_settings(**kw),
        "log settings": lambda **kw: client.get_log_settings(**kw),
        "shared memory status": lambda **kw: client.get_system_shared_memory_status(**kw),
        "load": lambda **kw: client.load_model("vae_encoder", **kw),
    }


def test_grpc_admin_calls_need_the_key(triton) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    good = {ADMIN_KEY_GRPC_METADATA: triton.admin_key}
    wrong = {ADMIN_KEY_GRPC_METADATA: "not-the-key-" + "x" * 32}
    for name, call in _grpc_calls(client).items():
        for headers in (None, wrong, {ADMIN_KEY_HEADER: triton.admin_key}):
            with pytest.raises(InferenceServerException, match=RESTRICTED):
                call(headers=headers)
        call(headers=good)  # works with the key
        assert name
    assert "pipeline" in {m.name for m in client.get_model_repository_index(headers=good).models}
    assert client.get_model_config("pipeline", headers=good).config.name == "pipeline"


def test_grpc_unload_needs_the_key(triton) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    good = {ADMIN_KEY_GRPC_METADATA: triton.admin_key}
    with pytest.raises(InferenceServerException, match=RESTRICTED):
        client.unload_model("vae_encoder")
    assert client.is_model_ready("vae_encoder")
    client.unload_model("vae_encoder", headers=good, unload_dependents=False)
    try:
        assert not client.is_model_ready("vae_encoder")
    finally:
        client.load_model("vae_encoder", headers=good)
    assert client.is_model_ready("vae_encoder")


def test_grpc_load_with_a_file_override_is_refused_without_the_key(triton, tmp_path: Path) -> None:
    """The attack that ran Python as root: a repository load carrying its own model.py."""
    marker = tmp_path / "pwned"
    evil = f"open({str(marker)!r}, 'w').write('ran')\n"
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    with pytest.raises(InferenceServerException, match=RESTRICTED):
        client.load_model(
            "evil",
            config=json.dumps({"backend": "python", "max_batch_size": 0}),
            files={"file:1/model.py": evil.encode()},
        )
    assert not marker.exists()
    index = client.get_model_repository_index(headers={ADMIN_KEY_GRPC_METADATA: triton.admin_key})
    assert "evil" not in {m.name for m in index.models}


def test_grpc_inference_health_and_metadata_need_no_key(triton) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("pipeline")
    assert client.get_server_metadata().name == "triton"
    assert {i.name for i in client.get_model_metadata("pipeline").inputs} >= {"prompt"}
    result = client.infer(
        "pipeline",
        pipeline_inputs(grpcclient, prompt="a red circle on a white background", steps=2, seed=1),
        outputs=[grpcclient.InferRequestedOutput("images")],
        client_timeout=120,
    )
    images = result.as_numpy("images")
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8


# --------------------------------------------------------------------------- HTTP


def _http(triton, method: str, path: str, body: dict | None = None, headers: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{triton.http_url}{path}", data=data, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


HTTP_ADMIN = [
    ("POST", "/v2/repository/index", {}),
    ("GET", "/v2/models/pipeline/config", None),
    ("GET", "/v2/trace/setting", None),
    ("GET", "/v2/logging", None),
    ("GET", "/v2/systemsharedmemory/status", None),
    ("POST", "/v2/repository/models/vae_encoder/load", {}),
]


@pytest.mark.parametrize(("method", "path", "body"), HTTP_ADMIN)
def test_http_admin_calls_need_the_key(triton, method: str, path: str, body: dict | None) -> None:
    status, text = _http(triton, method, path, body)
    assert status == 403 and b"restricted" in text, (status, text)
    status, _ = _http(triton, method, path, body, {ADMIN_KEY_HEADER: "wrong-" + "x" * 40})
    assert status == 403
    status, text = _http(triton, method, path, body, {ADMIN_KEY_HEADER: triton.admin_key})
    assert status == 200, (status, text)


def test_http_unload_and_file_override_need_the_key(triton, tmp_path: Path) -> None:
    status, _ = _http(triton, "POST", "/v2/repository/models/vae_encoder/unload", {})
    assert status == 403
    marker = tmp_path / "pwned"
    evil = f"open({str(marker)!r}, 'w').write('ran')\n"
    import base64

    load = {
        "parameters": {
            "config": json.dumps({"backend": "python", "max_batch_size": 0}),
            "file:1/model.py": base64.b64encode(evil.encode()).decode(),
        }
    }
    status, text = _http(triton, "POST", "/v2/repository/models/evil/load", load)
    assert status == 403 and b"restricted" in text
    assert not marker.exists()
    key = {ADMIN_KEY_HEADER: triton.admin_key}
    status, _ = _http(triton, "POST", "/v2/repository/models/vae_encoder/unload", {}, key)
    try:
        assert status == 200
    finally:
        assert _http(triton, "POST", "/v2/repository/models/vae_encoder/load", {}, key)[0] == 200
    assert _http(triton, "GET", "/v2/models/vae_encoder/ready")[0] == 200


def test_http_inference_health_and_metadata_need_no_key(triton) -> None:
    assert _http(triton, "GET", "/v2/health/ready")[0] == 200
    status, text = _http(triton, "GET", "/v2/models/pipeline")
    assert status == 200 and json.loads(text)["name"] == "pipeline"
    infer = {
        "inputs": [
            {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a blue square"]},
            {"name": "steps", "shape": [1], "datatype": "INT32", "data": [2]},
        ],
        "outputs": [{"name": "seeds"}],
    }
    status, text = _http(triton, "POST", "/v2/models/pipeline/infer", infer)
    assert status == 200, text
    assert json.loads(text)["outputs"][0]["name"] == "seeds"
