"""The one check of an RFC 9457 problem response that the control-plane tests share."""

from __future__ import annotations

from typing import Any


def assert_problem(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    """An RFC 9457 problem of ``status``; with ``field``, its ``errors`` name that field."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert body["status"] == status and body["title"] and body["type"] == "about:blank", body
    if field is not None:
        assert field in [e["field"] for e in body["errors"]], body
    return body
