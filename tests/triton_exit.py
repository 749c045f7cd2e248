"""How the tests judge a stopped ``tritonserver`` (shared by the session fixture and the
registry tests' own Triton): it must exit 0, every model unloaded within its exit timeout.

A model left "live" at the stop is a leak worth failing for. The one seen so far: a client that
cancels a decoupled model's gRPC stream after its final response (what ``astream_generate`` did
before it learned to let the stream end) leaves ``pipeline_stream`` live for good in Triton 2.51;
``tests/test_triton_stream.py`` keeps it fixed."""

from __future__ import annotations

import re


def live_at_exit(log: str) -> int | None:
    """How many models Triton still counted live when its stop gave up (None: it did not)."""
    counts = re.findall(r"Found (\d+) live models", log)
    return int(counts[-1]) if counts and "Exit timeout expired" in log else None


def assert_stopped_cleanly(server, code: int) -> None:  # type: ignore[no-untyped-def]
    if code == 0:
        return
    log = server.log_text()
    stopping = log.rfind("Signal (15) received")
    after = log[stopping:] if stopping >= 0 else log
    raise AssertionError(
        f"tritonserver did not stop cleanly (exit {code}; models still live when its exit timeout "
        f"ran out: {live_at_exit(after)}):\n{log[-3000:]}"
    )
