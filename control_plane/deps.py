"""FastAPI dependencies for the app's resources (settings, services, database sessions).

``SessionDep`` is read-only for ``GET`` and ``HEAD`` requests (and WebSockets) and writing for
the other methods, so that a read route never takes SQLite's writer lock (and could not write
by mistake: a read-only session refuses). ``ReadSessionDep`` is read-only whatever the method
(authentication, a ``POST`` that only reads).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import HTTPConnection

from sfumato.control_plane.services import Services

READ_METHODS = frozenset({"GET", "HEAD"})


def get_services(connection: HTTPConnection) -> Services:
    return connection.app.state.services


async def get_read_session(
    services: Annotated[Services, Depends(get_services)],
) -> AsyncIterator[AsyncSession]:
    async with services.read_sessions() as session:
        yield session


async def get_session(
    connection: HTTPConnection,
    services: Annotated[Services, Depends(get_services)],
    read: Annotated[AsyncSession, Depends(get_read_session)],
) -> AsyncIterator[AsyncSession]:
    if connection.scope.get("method", "GET") in READ_METHODS:
        yield read  # the request's one read-only session, shared with authentication
        return
    async with services.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]
ReadSessionDep = Annotated[AsyncSession, Depends(get_read_session)]
ServicesDep = Annotated[Services, Depends(get_services)]
