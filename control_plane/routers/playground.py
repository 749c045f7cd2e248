"""The web playground: ``/`` serves ``control_plane/static/index.html``, ``/playground/...`` its
CSS and JavaScript modules. Plain files, no build step, nothing from a CDN.

The page is a client of the public API like any other (the API key or token it holds stays in
the browser tab's ``sessionStorage``): these routes serve files only, take no credentials and
touch no database. Every response carries a strict Content-Security-Policy: scripts and styles
from this origin only (no inline script, no ``eval``), images from this origin and ``blob:``
/ ``data:`` URLs (the downloaded PNGs and the previews), fetches to this origin only, no frames.
``/docs`` (Swagger UI) keeps FastAPI's own page and is not covered by this policy.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
PREFIX = "/playground"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "form-action 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Revalidated on each load (ETag / Last-Modified), so an upgrade shows at once.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def playground() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)


class PlaygroundFiles(StaticFiles):
    """The page's CSS and modules, with the same security headers as the page."""

    async def get_response(self, path: str, scope: Scope):  # type: ignore[no-untyped-def]
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def static_files() -> PlaygroundFiles:
    """The ASGI app to mount at :data:`PREFIX`."""
    return PlaygroundFiles(directory=STATIC_DIR)
