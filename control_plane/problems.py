"""RFC 9457 problem details: every error response of the API, mapped in this one place.

* :class:`sfumato.errors.SfumatoError` subclasses carry their status and title;
* FastAPI / Pydantic validation errors become 422 with an ``errors`` list naming each field;
* Starlette HTTP errors (unknown route, wrong method) keep their status;
* anything else is a bug: the app's request middleware logs it with its traceback and answers
  a problem 500 (:func:`internal_error_body`), keeping the connection.

Refusals by a limit (429, 413) are counted here, in ``sfumato_rejections_total{limit}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sfumato.errors import (
    AuthenticationError,
    PayloadTooLargeError,
    RateLimitedError,
    SfumatoError,
    UsageError,
)

PROBLEM_JSON = "application/problem+json"


def problem_body(status: int, title: str, detail: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return body


def problem(status: int, title: str, detail: str | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(
        problem_body(status, title, detail, **extra), status_code=status, media_type=PROBLEM_JSON
    )


def internal_error_body(path: str, request_id: str) -> dict[str, Any]:
    """The 500 for an unknown exception: no detail of the bug, the request id to look it up."""
    return problem_body(
        500,
        "Internal error",
        f"an unexpected error; the service's log has it under request id {request_id}",
        instance=path,
    )


def _count_rejection(request: Request, limit: str) -> None:
    services = getattr(request.app.state, "services", None)
    if services is not None:
        services.metrics.rejections.labels(limit=limit).inc()


def _field_path(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or str(loc[-1] if loc else "")


async def _sfumato_error(request: Request, exc: SfumatoError) -> JSONResponse:
    extra: dict[str, Any] = {"instance": request.url.path}
    if isinstance(exc, UsageError) and exc.field:
        extra["errors"] = [{"field": exc.field, "message": str(exc)}]
    response = problem(exc.http_status, exc.title, str(exc), **extra)
    if isinstance(exc, RateLimitedError):
        response.headers["Retry-After"] = str(exc.retry_after)
        _count_rejection(request, exc.limit)
    if isinstance(exc, PayloadTooLargeError):
        _count_rejection(request, "image_size")
    if isinstance(exc, AuthenticationError):
        response.headers["WWW-Authenticate"] = 'Bearer realm="sfumato"'
    return response


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{"field": _field_path(e.get("loc", ())), "message": e.get("msg", "")} for e in exc.errors()]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return problem(422, "Invalid request", detail, errors=errors, instance=request.url.path)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    response = problem(exc.status_code, _reason(exc.status_code), str(exc.detail), instance=request.url.path)
    for key, value in (exc.headers or {}).items():
        response.headers[key] = value
    return response


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def install(app: FastAPI) -> None:
    app.add_exception_handler(SfumatoError, _sfumato_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]


# draft-ietf-httpapi-ratelimit-headers-11, on every response of a rate-limited route.
RATE_LIMIT_HEADERS: dict[str, Any] = {
    "RateLimit-Policy": {
        "description": 'the quota policies this request counted against: `"requests";q=120;w=60`',
        "schema": {"type": "string"},
    },
    "RateLimit": {
        "description": 'what is left of each, and the seconds until it grows: `"requests";r=117;t=42`',
        "schema": {"type": "string"},
    },
}

PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "description": "The body is not readable (not UTF-8 / not JSON at all), or a query "
        "parameter does not parse (a `cursor` this API did not make)",
        "content": {
            PROBLEM_JSON: {
                "example": {
                    "type": "about:blank",
                    "title": "Bad Request",
                    "status": 400,
                    "detail": "There was an error parsing the body",
                }
            }
        },
    },
    401: {
        "description": "Missing or invalid credentials",
        "content": {
            PROBLEM_JSON: {
                "example": {
                    "type": "about:blank",
                    "title": "Unauthorized",
                    "status": 401,
                    "detail": "missing bearer credentials",
                }
            }
        },
    },
    422: {
        "description": "A field is invalid",
        "content": {
            PROBLEM_JSON: {
                "example": {
                    "type": "about:blank",
                    "title": "Invalid request",
                    "status": 422,
                    "detail": "width: Value error, 36 is not a multiple of 8",
                    "errors": [{"field": "width", "message": "Value error, 36 is not a multiple of 8"}],
                }
            }
        },
    },
    429: {
        "description": "Rate limited (see Retry-After, and the RateLimit fields)",
        "headers": {
            "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}},
            **RATE_LIMIT_HEADERS,
        },
        "content": {
            PROBLEM_JSON: {
                "example": {
                    "type": "about:blank",
                    "title": "Too many requests",
                    "status": 429,
                    "detail": "rate limit 120/minute exceeded",
                }
            }
        },
    },
}
PROBLEM_RESPONSES[503] = {
    "description": "Overloaded: more requests in flight than the service takes (load shedding); "
    "retry after Retry-After",
    "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
    "content": {
        PROBLEM_JSON: {
            "example": {
                "type": "about:blank",
                "title": "Service unavailable",
                "status": 503,
                "detail": "overloaded: 64 requests in flight; retry after 1 s",
            }
        }
    },
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {
        "description": "No such resource (or not yours)",
        "content": {
            PROBLEM_JSON: {
                "example": {
                    "type": "about:blank",
                    "title": "Not found",
                    "status": 404,
                    "detail": "no generation 5f2c...",
                }
            }
        },
    },
}


def problem_response(
    status: int, title: str, description: str, detail: str
) -> dict[int | str, dict[str, Any]]:
    """An OpenAPI ``responses`` entry: a problem of ``status``, with an example."""
    example = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return {status: {"description": description, "content": {PROBLEM_JSON: {"example": example}}}}


FORBIDDEN = problem_response(
    403, "Forbidden", "The caller's role does not allow this", "this action needs the admin role"
)
