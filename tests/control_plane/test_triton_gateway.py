"""The Triton gateway against the session's real ``tritonserver``, whose model-repository and
model-config protocols are restricted to the installation's key (as `sfumato up` starts it): the
gateway's calls carry it (the admin routes and the model configuration work), another
installation's key is refused as 403 and is not taken for an outage."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format

from sfumato.clients.triton_grpc import TritonAccessError

from .problems import assert_problem


def _instances(repository: Path, model: str) -> int:
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(
        (repository / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    return sum(group.count for group in config.instance_group)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # no job rows involved
async def test_restricted_calls_carry_the_admin_key(api_factory, triton, exported_repo) -> None:
    settings = {"triton_url": triton.grpc_url}
    api = await api_factory(triton_admin_key=triton.admin_key, **settings)
    root = await api.user("root", role="admin")
    gateway = api.app.state.services.triton  # type: ignore[attr-defined]

    r = await api.client.get("/v1/triton/models", headers=api.headers(root))
    assert r.status_code == 200, r.text
    states = {m["name"]: m["state"] for m in r.json()}  # the repository's models
    assert states["pipeline"] == states["pipeline_stream"] == "READY", states
    assert await gateway.pipeline_capacity() == _instances(exported_repo, "pipeline") > 1
    assert (await api.client.get("/readyz")).status_code == 200

    # Another installation's key: refused (403), and Triton is not taken for down.
    other = await api_factory(triton_admin_key="another-installations-key-" + "x" * 20, **settings)
    other_root = await other.user("root2", role="admin")
    body = assert_problem(await other.client.get("/v1/triton/models", headers=other.headers(other_root)), 403)
    assert "restricted" in body["detail"]
    with pytest.raises(TritonAccessError):
        await other.app.state.services.triton.pipeline_capacity()  # type: ignore[attr-defined]
    assert await other.app.state.services.triton.readiness() is None  # type: ignore[attr-defined]
