"""The gRPC edge, end to end: the real Caddy binary in front of the real Triton, asking a real
control plane served over HTTP (uvicorn in a thread), called with the real ``tritonclient.grpc``
(gRPC statuses come from the grpc-status the edge sends). On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import queue
import secrets
import struct
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import uvicorn
from PIL import Image
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from sfumato.clients.triton_grpc import TritonAccessError, auth_headers, generate, pipeline_inputs
from sfumato.control_plane import accounts, migrate
from sfumato.control_plane.app import create_app
from sfumato.control_plane.db import create_engine, session_factory
from sfumato.control_plane.edge_proxy import EdgeProxy, find_caddy, render_caddyfile
from sfumato.control_plane.security import issue_token
from sfumato.triton_server import ADMIN_KEY_GRPC_METADATA, free_port

from .conftest import _pg_admin, _pg_url, _run, make_settings

pytestmark = pytest.mark.slow
PROMPT = "a red circle on a white background"
SUBMIT_LIMIT = 6  # per user and minute: the rate-limit test goes over it
QUOTA = 2  # unfinished jobs + gRPC inference calls per user


@dataclass
class Stack:
    api: str
    edge: EdgeProxy
    app: object
    database_url: str
    settings: object

    @property
    def services(self):  # type: ignore[no-untyped-def]
        return self.app.state.services  # type: ignore[attr-defined]

    def user(self, name: str | None = None) -> dict[str, str]:
        """A new member with an API key: ``{"id", "key", "key_id"}``."""

        async def make() -> dict[str, str]:
            engine = create_engine(self.database_url)
            try:
                async with session_factory(engine)() as session:
                    user = await accounts.create_user(
                        session=session, name=name or f"u{secrets.token_hex(4)}", role="member"
                    )
                    key, plaintext = await accounts.create_key(session=session, user_id=user.id)
                    return {"id": user.id, "key": plaintext, "key_id": key.id}
            finally:
                await engine.dispose()

        result: dict[str, str] = {}
        _run(_store(make(), result))
        return result

    def revoke(self, user: dict[str, str]) -> None:
        async def revoke() -> None:
            engine = create_engine(self.database_url)
            try:
                async with session_factory(engine)() as session:
                    await accounts.revoke_key(session=session, key_id=user["key_id"], owner_id=user["id"])
            finally:
                await engine.dispose()

        _run(revoke())

    def client(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(self.edge.url)


async def _store(coro, into: dict) -> None:  # type: ignore[no-untyped-def]
    into.update(await coro)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, triton
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("edge")
    pg_name = None
    if request.param == "sqlite":
        path = tmp / "sfumato.db"
        migrate.upgrade(f"sqlite+aiosqlite:///{path}")
        database_url = f"sqlite+aiosqlite:///{path}"
    else:
        pg_name = f"sfumato_edge_{secrets.token_hex(4)}"
        _run(_pg_admin(f"CREATE DATABASE {pg_name}"))
        database_url = _pg_url(pg_name)
        migrate.upgrade(database_url)
    settings = make_settings(
        database_url,
        tmp / "data",
        triton_url=triton.grpc_url,
        rate_limit="1000/minute",
        submit_rate_limit=f"{SUBMIT_LIMIT}/minute",
        max_queued_jobs_per_user=QUOTA,
    )
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, name="control-plane", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the control plane did not start"
        time.sleep(0.05)
    api = f"http://127.0.0.1:{port}"
    edge = EdgeProxy(
        work_dir=tmp / "edge",
        api=api,
        triton=triton.grpc_url,
        edge_key=settings.edge_secret(),
        port=free_port(),
        max_body_bytes=settings.max_body_bytes,
    )
    edge.start(timeout=30)
    try:
        yield Stack(api=api, edge=edge, app=app, database_url=database_url, settings=settings)
    finally:
        assert edge.stop() == 0
        server.should_exit = True
        thread.join(timeout=60)
        assert not thread.is_alive()
        if pg_name:
            _run(_pg_admin(f"DROP DATABASE IF EXISTS {pg_name} WITH (FORCE)"))


def _status(call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as info:
        call()
    return str(info.value.status()).removeprefix("StatusCode.")


def _infer(client: grpcclient.InferenceServerClient, key: str | None, model: str = "pipeline", **options):
    fields = {"prompt": PROMPT, "steps": 2, "seed": 7, **options}
    return client.infer(
        model,
        pipeline_inputs(grpcclient, **fields),
        outputs=[grpcclient.InferRequestedOutput("images")],
        headers=auth_headers(key),
        client_timeout=120,
    )


def _metric(stack: Stack, outcome: str) -> float:
    counter = stack.services.metrics.edge_requests.labels(outcome=outcome)
    return counter._value.get()


def wait_for(condition, *, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# --------------------------------------------------------------------------- who


def test_a_valid_key_passes_and_the_image_comes_back(stack: Stack, triton) -> None:
    user = stack.user()
    allowed = _metric(stack, "allowed")
    client = stack.client()
    assert client.is_server_live(headers=auth_headers(user["key"]))
    assert client.is_model_ready("pipeline", headers=auth_headers(user["key"]))
    assert {
        i.name for i in client.get_model_metadata("pipeline", headers=auth_headers(user["key"])).inputs
    } >= {"prompt"}
    through_edge = _infer(client, user["key"]).as_numpy("images")
    direct = _infer(grpcclient.InferenceServerClient(triton.grpc_url), None).as_numpy("images")
    assert through_edge.shape == (1, 32, 32, 3) and through_edge.dtype == np.uint8
    assert np.array_equal(through_edge, direct)  # same seed, same image: the body arrived intact
    assert _metric(stack, "allowed") == allowed + 4
    # The call's end came back from the proxy's access log: nothing of this user stays in flight
    # (entries would otherwise live until their deadline, minutes away).
    wait_for(lambda: stack.services.edge_calls.count(user["id"]) == 0, timeout=30, what="the end report")


def test_an_access_token_passes_too(stack: Stack) -> None:
    user = stack.user()
    token, _ = issue_token(
        subject=user["id"],
        role="member",
        key=stack.services.signing_key,
        algorithm="HS256",
        audience="sfumato",
        issuer="sfumato",
        ttl_s=60,
    )
    assert stack.client().is_model_ready("pipeline", headers=auth_headers(token))


def test_no_key_a_bad_key_and_a_revoked_key_are_unauthenticated(stack: Stack) -> None:
    client = stack.client()
    before = _metric(stack, "unauthenticated")
    user = stack.user()
    assert _status(lambda: _infer(client, None)) == "UNAUTHENTICATED"
    assert _status(lambda: client.is_server_live()) == "UNAUTHENTICATED"
    assert _status(lambda: _infer(client, "sfm_aaaaaaaaaaaa_" + "b" * 43)) == "UNAUTHENTICATED"
    assert _status(lambda: _infer(client, user["key"][:-2] + "xx")) == "UNAUTHENTICATED"
    assert _status(lambda: _infer(client, "not.a.jwt")) == "UNAUTHENTICATED"
    assert client.is_server_live(headers=auth_headers(user["key"]))
    stack.revoke(user)
    with pytest.raises(InferenceServerException, match="revoked"):
        _infer(client, user["key"])
    assert _metric(stack, "unauthenticated") == before + 6


# --------------------------------------------------------------------------- what


def test_other_models_are_refused(stack: Stack) -> None:
    user = stack.user()
    client = stack.client()
    headers = auth_headers(user["key"])
    assert _status(lambda: client.infer("unet", [], headers=headers)) == "PERMISSION_DENIED"
    assert _status(lambda: client.get_model_metadata("unet", headers=headers)) == "PERMISSION_DENIED"
    assert _status(lambda: client.is_model_ready("text_encoder", headers=headers)) == "PERMISSION_DENIED"
    with pytest.raises(InferenceServerException, match="'vae_decoder' does not pass the edge"):
        _infer(client, user["key"], model="vae_decoder")


def test_other_rpcs_are_refused_even_with_the_admin_key(stack: Stack, triton) -> None:
    user = stack.user()
    client = stack.client()
    for headers in (
        auth_headers(user["key"]),
        {**auth_headers(user["key"]), ADMIN_KEY_GRPC_METADATA: triton.admin_key},
    ):
        for call in (
            lambda h=headers: client.get_model_repository_index(headers=h),
            lambda h=headers: client.get_model_config("pipeline", headers=h),
            lambda h=headers: client.get_inference_statistics("pipeline", headers=h),
            lambda h=headers: client.unload_model("vae_encoder", headers=h),
            lambda h=headers: client.get_log_settings(headers=h),
        ):
            assert _status(call) == "PERMISSION_DENIED"
    assert grpcclient.InferenceServerClient(triton.grpc_url).is_model_ready("vae_encoder")


def _raw_infer(stack: Stack, key: str, payload: bytes) -> grpc.RpcError | bytes:
    """A ModelInfer call with a hand-made body (what a client bent on a bypass would send)."""
    channel = grpc.insecure_channel(stack.edge.url)
    try:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        return call(payload, metadata=[("authorization", f"Bearer {key}")], timeout=120)
    except grpc.RpcError as exc:
        return exc
    finally:
        channel.close()


def test_a_repeated_model_name_cannot_smuggle_another_model(stack: Stack) -> None:
    """Protobuf lets a field repeat and the last one wins: the edge parses the whole message."""
    user = stack.user()
    request = service_pb2.ModelInferRequest(model_name="pipeline")
    prompt = request.inputs.add(name="prompt", datatype="BYTES", shape=[1])
    prompt.contents.bytes_contents.append(PROMPT.encode())
    steps = request.inputs.add(name="steps", datatype="INT32", shape=[1])
    steps.contents.int_contents.append(2)
    smuggled = (
        request.SerializeToString() + service_pb2.ModelInferRequest(model_name="unet").SerializeToString()
    )
    assert service_pb2.ModelInferRequest.FromString(smuggled).model_name == "unet"  # what Triton would see
    refused = _raw_infer(stack, user["key"], smuggled)
    assert isinstance(refused, grpc.RpcError) and refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'unet'" in refused.details()
    # The other way round is a plain pipeline call, and passes.
    plain = service_pb2.ModelInferRequest(model_name="unet").SerializeToString() + request.SerializeToString()
    answer = _raw_infer(stack, user["key"], plain)
    assert isinstance(answer, bytes), answer
    assert service_pb2.ModelInferResponse.FromString(answer).model_name == "pipeline"


def test_a_stream_passes_and_every_message_in_it_is_checked(stack: Stack) -> None:
    user = stack.user()
    client = stack.client()
    results: queue.Queue = queue.Queue()
    client.start_stream(
        callback=lambda result, error: results.put((result, error)), headers=auth_headers(user["key"])
    )
    for seed in (1, 2):
        client.async_stream_infer("pipeline", pipeline_inputs(grpcclient, prompt=PROMPT, steps=2, seed=seed))
    client.stop_stream()  # the edge forwards a stream once the client half-closes it
    seeds = []
    while not results.empty():
        result, error = results.get()
        assert error is None, error
        seeds.append(int(result.as_numpy("seeds")[0]))
    assert sorted(seeds) == [1, 2]

    client.start_stream(
        callback=lambda result, error: results.put((result, error)), headers=auth_headers(user["key"])
    )
    client.async_stream_infer("pipeline", pipeline_inputs(grpcclient, prompt=PROMPT, steps=2))
    client.async_stream_infer("unet", pipeline_inputs(grpcclient, prompt=PROMPT))
    client.stop_stream()
    outcomes = []
    while not results.empty():
        outcomes.append(results.get())
    assert len(outcomes) == 1 and outcomes[0][1] is not None
    assert "PERMISSION_DENIED" in str(outcomes[0][1].status()) and "'unet'" in str(outcomes[0][1])


# --------------------------------------------------------------------------- how much


def test_over_the_rate_limit_is_resource_exhausted(stack: Stack) -> None:
    user = stack.user()
    client = stack.client()
    limited = _metric(stack, "rate_limited")
    for _ in range(SUBMIT_LIMIT):
        _infer(client, user["key"])
    with pytest.raises(InferenceServerException, match="rate limit") as info:
        _infer(client, user["key"])
    assert str(info.value.status()) == "StatusCode.RESOURCE_EXHAUSTED"
    assert client.is_server_live(headers=auth_headers(user["key"]))  # metadata is not a submission
    _infer(client, stack.user()["key"])  # another user's bucket is their own
    assert _metric(stack, "rate_limited") == limited + 1


def test_over_the_unfinished_work_quota_is_resource_exhausted(stack: Stack) -> None:
    """REST jobs queued/running and gRPC calls in flight count together."""
    user = stack.user()
    client = stack.client()
    edge_key = {"X-Sfumato-Edge-Key": stack.settings.edge_secret()}
    with httpx.Client(base_url=stack.api, headers={"Authorization": f"Bearer {user['key']}"}) as api:
        r = api.post("/v1/generations", json={"prompt": PROMPT})  # no workers: stays queued
        assert r.status_code == 202, r.text
        # A call in flight that the proxy has not reported ended: the control plane sees the
        # authorize request exactly as the edge sends it.
        body = service_pb2.ModelInferRequest(model_name="pipeline").SerializeToString()
        held = api.post(
            "/internal/edge/authorize",
            content=struct.pack(">BI", 0, len(body)) + body,
            headers={
                **edge_key,
                "X-Sfumato-Rpc": "/inference.GRPCInferenceService/ModelInfer",
                "X-Sfumato-Call": "held-1",
            },
        )
        assert held.status_code == 200, held.headers
        assert stack.services.edge_calls.count(user["id"]) == 1
        with pytest.raises(InferenceServerException, match="the limit is 2") as info:
            _infer(client, user["key"])
        assert str(info.value.status()) == "StatusCode.RESOURCE_EXHAUSTED"
        assert client.is_model_ready("pipeline", headers=auth_headers(user["key"]))  # not work

        # The held call ends: one slot is free again.
        assert (
            api.post("/internal/edge/calls/end", json={"calls": ["held-1"]}, headers=edge_key).status_code
            == 204
        )
        _infer(client, user["key"])
        # The queued REST job alone still counts: a stream of two requests is over the quota.
        results: queue.Queue = queue.Queue()
        client.start_stream(
            callback=lambda result, error: results.put(error), headers=auth_headers(user["key"])
        )
        for _ in range(2):
            client.async_stream_infer("pipeline", pipeline_inputs(grpcclient, prompt=PROMPT, steps=2))
        client.stop_stream()
        error = results.get_nowait()
        assert error is not None and "RESOURCE_EXHAUSTED" in str(error.status())
        assert "the limit is 2" in str(error)
    assert _metric(stack, "quota") >= 2


# --------------------------------------------------------------------------- the edge's own surface


def test_failed_authentication_is_throttled_per_caller_address(stack: Stack) -> None:
    """The edge passes the caller's address; failures spend that address's budget as on REST."""
    budget = stack.settings.auth_failure_rate_limit  # "30/minute"
    tries = int(budget.split("/")[0])
    user = stack.user()
    attacker, bystander = (
        f"198.51.100.{secrets.randbelow(250) + 1}",
        f"203.0.113.{secrets.randbelow(250) + 1}",
    )

    def authorize(address: str, authorization: str | None) -> httpx.Response:
        headers = {
            "X-Sfumato-Edge-Key": stack.settings.edge_secret(),
            "X-Sfumato-Rpc": "/inference.GRPCInferenceService/ServerLive",
            "X-Sfumato-Client-Address": address,
            "X-Sfumato-Call": secrets.token_hex(8),
        }
        if authorization:
            headers["Authorization"] = authorization
        return httpx.post(f"{stack.api}/internal/edge/authorize", headers=headers, content=b"", timeout=30)

    for i in range(tries):
        refused = authorize(attacker, None if i % 2 else "Bearer sfm_wrong")
        assert refused.status_code == 403 and refused.headers["X-Grpc-Status"] == "16", refused.headers
    # Spent: even a valid key from that address is refused, before it is looked up.
    throttled = authorize(attacker, f"Bearer {user['key']}")
    assert throttled.status_code == 403 and throttled.headers["X-Grpc-Status"] == "8", throttled.headers
    assert "retry in" in urllib.parse.unquote(throttled.headers["X-Grpc-Message"])
    # Another address is not affected.
    assert authorize(bystander, f"Bearer {user['key']}").status_code == 200


def test_the_edge_passes_the_callers_address_and_overwrites_a_forged_one() -> None:
    caddyfile = render_caddyfile(
        host="127.0.0.1", port=3, triton="127.0.0.1:2", api="127.0.0.1:1", max_body_bytes=10
    )
    # header_up sets the header: a value the caller sent under that name is replaced.
    assert "header_up X-Sfumato-Client-Address {http.request.remote.host}" in caddyfile


def test_the_internal_routes_answer_only_the_edge(stack: Stack) -> None:
    user = stack.user()
    with httpx.Client(base_url=stack.api) as api:
        for key in (None, "wrong-" + "x" * 40):
            headers = {"Authorization": f"Bearer {user['key']}"} | (
                {"X-Sfumato-Edge-Key": key} if key else {}
            )
            assert api.post("/internal/edge/authorize", headers=headers).status_code == 404
            assert (
                api.post("/internal/edge/calls/end", json={"calls": []}, headers=headers).status_code == 404
            )
        paths = api.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/internal")]


def test_the_cli_and_the_sdk_pass_the_key(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sfumato.cli import main

    user = stack.user()
    assert generate(stack.edge.url, PROMPT, steps=2, api_key=user["key"]).images.shape == (1, 32, 32, 3)
    with pytest.raises(TritonAccessError):
        generate(stack.edge.url, PROMPT, steps=2)
    out = tmp_path / "out.png"
    assert (
        main(
            [
                "generate",
                PROMPT,
                "--grpc",
                stack.edge.url,
                "--key",
                user["key"],
                "--steps",
                "2",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setenv("SFUMATO_API_KEY", user["key"])
    assert main(["generate", PROMPT, "--grpc", stack.edge.url, "--steps", "2", "-o", str(out)]) == 0
    monkeypatch.delenv("SFUMATO_API_KEY")
    assert main(["generate", PROMPT, "--grpc", stack.edge.url, "--steps", "2", "-o", str(out)]) == 2


def test_the_caddyfile_keeps_secrets_out_and_binds_where_told(tmp_path: Path) -> None:
    text = render_caddyfile(
        host="127.0.0.1", port=8003, triton="127.0.0.1:8001", api="http://127.0.0.1:8080", max_body_bytes=1024
    )
    assert "http://127.0.0.1:8003" in text and "bind 127.0.0.1" in text and "{env.SFUMATO_EDGE_KEY}" in text
    assert "tls " not in text
    tls = render_caddyfile(
        host="0.0.0.0",
        port=9443,
        triton="127.0.0.1:8001",
        api="http://127.0.0.1:8080",
        max_body_bytes=1024,
        tls_cert=tmp_path / "c.pem",
        tls_key=tmp_path / "k.pem",
    )
    assert "https://0.0.0.0:9443" in tls and f'tls "{tmp_path / "c.pem"}" "{tmp_path / "k.pem"}"' in tls
    for name, config in (("plain", text), ("tls", tls)):  # both parse as Caddy configurations
        path = tmp_path / name
        path.write_text(config)
        adapted = subprocess.run(
            [str(find_caddy()), "adapt", "--config", str(path), "--adapter", "caddyfile"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert adapted.returncode == 0, adapted.stderr
        assert json.loads(adapted.stdout)["apps"]["http"]["servers"]


def test_the_readme_examples_run_as_written_through_the_edge(
    stack: Stack, triton, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The README's two tritonclient examples (plain, then streamed with previews), with a real
    key, through the real edge: the stream's responses arrive after the client ends its side."""

    section = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = section.split("## Calling Triton directly")[1].split("\n## ")[0]
    blocks = [b.split("```")[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) == 2, "the plain and the streaming example"
    user = stack.user()
    code = "\n".join(blocks).replace("localhost:8003", stack.edge.url).replace("sfm_...", user["key"])
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0].strip() for line in printed] == [f"step {i} of 25" for i in range(1, 26)]
    assert sum("(preview)" in line for line in printed) == 4  # steps 5, 10, 15, 20
    with Image.open(tmp_path / "out.png") as png:
        expected = generate(triton.grpc_url, "a red circle on a white background", seed=42).images[0]
        assert np.array_equal(np.asarray(png), expected)


def test_the_streaming_clients_pass_the_edge(stack: Stack, triton) -> None:
    """``stream_generate`` (sync) and ``astream_generate`` (aio) end their side of the stream
    after the request, so the edge forwards it; progress then the images come back."""
    import asyncio

    import tritonclient.grpc.aio as aio

    from sfumato.clients.triton_grpc import Generation, Progress, astream_generate, stream_generate

    user = stack.user()
    events = list(stream_generate(stack.edge.url, PROMPT, steps=3, seed=5, headers=auth_headers(user["key"])))
    assert [type(e) for e in events] == [Progress, Progress, Progress, Generation]
    expected = generate(triton.grpc_url, PROMPT, steps=3, seed=5).images

    async def aio_events() -> list:
        client = aio.InferenceServerClient(stack.edge.url)
        try:
            return [
                e
                async for e in astream_generate(
                    client, PROMPT, steps=3, seed=5, headers=auth_headers(user["key"])
                )
            ]
        finally:
            await client.close()

    streamed = asyncio.run(aio_events())
    assert [type(e) for e in streamed] == [Progress, Progress, Progress, Generation]
    assert np.array_equal(events[-1].images, expected) and np.array_equal(streamed[-1].images, expected)
