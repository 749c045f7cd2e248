"""How the tests stop a ``tritonserver`` and judge the stop (the session fixture and the registry
tests' own Triton): every model version that was ready must log its unload, and Triton must exit 0.

One upstream race is tolerated, with a warning: Triton 2.51 can keep a decoupled model
(``pipeline_stream``, or a registered model's ``<name>__pipeline_stream``) live for good when a
client's cancel of its gRPC stream crosses the final response. Our clients no longer cancel a
stream that has ended (``astream_generate`` reads it to its end; see
``test_streams_read_to_their_end_leave_pipeline_stream_free_to_unload``), but the tests also cancel
streams mid-way on purpose, and one of those cancels can land on the final response on a busy
machine. Triton then waits out its exit timeout and the process guard removes the rest. Any
other model left live, or any other failure to stop, fails the session."""

from __future__ import annotations

import re
import warnings

import tritonclient.grpc as grpcclient

from sfumato.triton_server import ADMIN_KEY_GRPC_METADATA


def _ready_versions(server) -> set[tuple[str, str]]:  # type: ignore[no-untyped-def]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        index = client.get_model_repository_index(
            headers={ADMIN_KEY_GRPC_METADATA: server.admin_key}, as_json=True
        )
    finally:
        client.close()
    live = ("READY", "UNLOADING")  # UNLOADING: a test's unload that never finished
    return {(m["name"], m.get("version", "")) for m in index.get("models", []) if m.get("state") in live}


def _unloaded(log: str) -> set[tuple[str, str]]:
    return set(re.findall(r"successfully unloaded '([^']+)' version (\d+)", log))


def tolerated(name: str) -> bool:
    return name == "pipeline_stream" or name.endswith("__pipeline_stream")


def stop_and_check(server) -> None:  # type: ignore[no-untyped-def]
    """Stop ``server`` and fail unless every live model version unloaded (one race excepted)."""
    ready = _ready_versions(server)
    code = server.stop()
    log = server.log_text()
    stopping = log.rfind("Signal (15) received")
    after = log[stopping:] if stopping >= 0 else ""
    left = sorted(ready - _unloaded(after))
    if code == 0 and not left:
        return
    if stopping >= 0 and "Exit timeout expired" in after and left and all(tolerated(n) for n, _ in left):
        warnings.warn(
            f"tritonserver exit timeout with {left} still live (an upstream race; see tests/triton_exit.py)",
            stacklevel=2,
        )
        return
    raise AssertionError(
        f"tritonserver did not stop cleanly (exit {code}; still live: {left}):\n{log[-3000:]}"
    )
