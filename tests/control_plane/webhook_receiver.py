"""A real local HTTP(S) server that receives webhooks, for the webhook tests.

It records every request (path, headers, body) and answers from a script: a queue of answers
(status, headers, body, or ``"hang"`` / ``"flood"`` for a receiver that never answers or sends
an endless body); after the script, 204. Served by aiohttp on 127.0.0.1 (a free port), in the
test's own event loop; with ``tls`` it serves a certificate for :data:`TLS_HOST` signed by a
throw-away CA made with ``cryptography``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from . import tls

TLS_HOST = "hooks.sfumato.test"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Answer:
    status: int = 204
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    mode: str = "answer"  # answer | hang (never answers) | flood (an endless 200 body)


@dataclass
class Receiver:
    port: int = 0
    scheme: str = "http"
    requests: list[Received] = field(default_factory=list)
    script: deque[Answer] = field(default_factory=deque)
    flood_bytes_sent: int = 0
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    ca_file: Path | None = None

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def answer(self, *answers: Answer) -> None:
        self.script.extend(answers)

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Received(request.path, {k.lower(): v for k, v in request.headers.items()}, body))
        answer = self.script.popleft() if self.script else Answer()
        if answer.mode == "hang":
            await self._release.wait()
            return web.Response(status=204)
        if answer.mode == "flood":
            response = web.StreamResponse(status=200)
            await response.prepare(request)
            chunk = b"x" * 65536
            with contextlib.suppress(ConnectionError, RuntimeError):
                while self.flood_bytes_sent < 64 * 2**20 and not self._release.is_set():
                    await response.write(chunk)
                    self.flood_bytes_sent += len(chunk)
            return response
        return web.Response(status=answer.status, body=answer.body, headers=answer.headers)

    async def start(self, *, tls_dir: Path | None = None) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        context = None
        if tls_dir is not None:
            self.ca_file, cert, key = make_ca_and_cert(tls_dir)
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert, key)
            self.scheme = "https"
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()


def make_ca_and_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for :data:`TLS_HOST` (a name only, no IP) signed by it."""
    return tls.make_ca_and_cert(directory, host=TLS_HOST, common_name=TLS_HOST, ca_name="test webhook CA")


def resolver_stub(table: dict[str, list[str]], calls: list[tuple[str, int]] | None = None) -> Any:
    """A DNS resolver at the resolver boundary (no DNS server can be run for these names here):
    ``table`` maps names to their addresses; an unknown name fails as getaddrinfo does."""
    import socket

    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append((host, port))
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(table[host])

    return resolve
