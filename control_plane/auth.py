"""Who is calling: ``Authorization: Bearer`` with an API key (``sfm_...``) or a JWT.

Authentication only reads (a read-only session: on SQLite it never waits for the writer lock);
an API key's last use is noted in memory and written in batches (:mod:`key_usage`).

Throttling, by the client address as uvicorn reports it (the peer, or the ``X-Forwarded-For``
of a proxy listed in ``--forwarded-allow-ips``): failed authentications (401) are counted per
address, and an address over ``SFUMATO_AUTH_FAILURE_RATE_LIMIT`` gets 429 before its
credentials are even looked at; password logins are limited per (user name, address) and per
address, so that nobody can lock a user out from another address.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated, NoReturn

import jwt
from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket, WebSocketDisconnect

from sfumato.control_plane import accounts, ratelimit
from sfumato.control_plane.deps import get_read_session, get_services
from sfumato.control_plane.models import ApiKey, User, utcnow
from sfumato.control_plane.security import decode_token, issue_token, secret_matches, split_api_key
from sfumato.control_plane.services import Services
from sfumato.errors import AuthenticationError, PermissionDeniedError

bearer = HTTPBearer(auto_error=False, description="An API key (sfm_...) or an access token (JWT)")


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    name: str
    role: str
    via: str  # "api_key" | "token"
    key_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def client_address(connection: HTTPConnection) -> str:
    """The caller's address as uvicorn gives it (behind a trusted proxy: the forwarded one)."""
    return connection.client.host if connection.client else "unknown"


async def _from_api_key(token: str, session: AsyncSession, services: Services) -> Principal:
    parts = split_api_key(token)
    if parts is None:
        raise AuthenticationError("malformed API key")
    lookup_id, secret = parts
    key = await session.get(ApiKey, lookup_id)
    if key is None or not secret_matches(secret, key.secret_hash):
        raise AuthenticationError("invalid API key")
    if key.revoked_at is not None:
        raise AuthenticationError("this API key has been revoked")
    user = await session.get(User, key.user_id)
    if user is None or user.disabled_at is not None:
        raise AuthenticationError("this API key's user is disabled")
    services.key_usage.note(key, utcnow())
    return Principal(user_id=user.id, name=user.name, role=user.role, via="api_key", key_id=key.id)


async def _from_token(token: str, session: AsyncSession, services: Services) -> Principal:
    s = services.settings
    try:
        claims = decode_token(
            token,
            key=services.signing_key,
            algorithm=s.jwt_algorithm,
            audience=s.jwt_audience,
            issuer=s.jwt_issuer,
        )
    except jwt.ExpiredSignatureError:
        raise AuthenticationError("the access token has expired") from None
    except jwt.InvalidTokenError as exc:
        raise AuthenticationError(f"invalid access token: {exc}") from None
    user = await session.get(User, str(claims["sub"]))
    if user is None or user.disabled_at is not None:
        raise AuthenticationError("the access token's user no longer exists or is disabled")
    return Principal(user_id=user.id, name=user.name, role=user.role, via="token")


async def authenticate_bearer(token: str, *, session: AsyncSession, services: Services) -> Principal:
    """The principal of a bearer credential (an API key ``sfm_...`` or an access token), or
    :class:`AuthenticationError`. REST (:func:`authenticate`) and the gRPC edge share it."""
    if token.startswith("sfm_"):
        return await _from_api_key(token, session, services)
    return await _from_token(token, session, services)


async def _failure_budget_left(services: Services, address: str) -> None:
    """429 for an address that has spent its failed authentications."""
    await services.limiter.check(
        services.settings.auth_failure_rate_limit, scope="auth_failures", principal=address
    )


async def _count_failure(services: Services, address: str) -> None:
    await services.limiter.count(
        services.settings.auth_failure_rate_limit, scope="auth_failures", principal=address
    )


async def refuse_missing_credentials(*, services: Services, address: str) -> NoReturn:
    """A request without credentials: counted as a failed authentication of ``address`` (429 once
    its budget is spent), else :class:`AuthenticationError`."""
    await _failure_budget_left(services, address)
    await _count_failure(services, address)
    raise AuthenticationError("missing bearer credentials (an API key or an access token)")


async def authenticate(*, token: str, session: AsyncSession, services: Services, address: str) -> Principal:
    """The principal a bearer token (API key or JWT) stands for, with the per-address throttle
    on failures. Ends ``session``'s transaction (read-only) before returning."""
    await _failure_budget_left(services, address)
    try:
        principal = await authenticate_bearer(token, session=session, services=services)
    except AuthenticationError:
        await session.commit()  # end the read transaction (nothing was written)
        await _count_failure(services, address)
        raise
    await session.commit()  # end the read transaction; the route's work starts its own
    return principal


async def get_principal(
    connection: HTTPConnection,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    session: Annotated[AsyncSession, Depends(get_read_session)],
    services: Annotated[Services, Depends(get_services)],
) -> Principal:
    address = client_address(connection)
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        await refuse_missing_credentials(services=services, address=address)
    principal = await authenticate(
        token=credentials.credentials, session=session, services=services, address=address
    )
    connection.state.principal = principal
    route = getattr(connection.scope.get("route"), "path", "")
    policy, limit = ratelimit.request_budget(
        services.settings, method=connection.scope.get("method", "GET"), route=route
    )
    await services.limiter.hit(limit, scope=policy, principal=principal.user_id)
    return principal


async def login(
    *, session: AsyncSession, services: Services, name: str, password: str, address: str
) -> tuple[str, int]:
    """A password login: ``(access token, lifetime in seconds)``; throttled per (user name,
    address) and per address, failures counted against the address like any 401."""
    s = services.settings
    await _failure_budget_left(services, address)
    await services.limiter.hit(s.login_address_rate_limit, scope="login_address", principal=address)
    # The address first: it never contains "/", so (address, name) pairs cannot collide.
    await services.limiter.hit(s.login_rate_limit, scope="login", principal=f"{address}/{name}")
    try:
        user = await accounts.authenticate(session=session, name=name, password=password)
    except AuthenticationError:
        await session.commit()
        await _count_failure(services, address)
        raise
    await session.commit()
    access, _ = issue_token(
        subject=user.id,
        role=user.role,
        key=services.signing_key,
        algorithm=s.jwt_algorithm,
        audience=s.jwt_audience,
        issuer=s.jwt_issuer,
        ttl_s=s.access_token_ttl_s,
    )
    return access, s.access_token_ttl_s


async def require_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.is_admin:
        raise PermissionDeniedError("this action needs the admin role")
    return principal


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]
AdminPrincipal = Annotated[Principal, Depends(require_admin)]


# --------------------------------------------------------------------------- WebSockets
# Browsers cannot set headers on a WebSocket: the credential comes as a query parameter
# (``?api_key=`` or ``?access_token=``) or as the first message ``{"authorization": "Bearer ..."}``.

WS_FIRST_MESSAGE_S = 10.0  # how long an accepted WebSocket may take to send its credential


async def websocket_credential(websocket: WebSocket, *, timeout_s: float = WS_FIRST_MESSAGE_S) -> str | None:
    """The bearer credential of an accepted WebSocket: its query parameter, else its first
    message; ``None`` when it sent none (in time, or in the expected form)."""
    token = websocket.query_params.get("api_key") or websocket.query_params.get("access_token")
    if token:
        return token
    try:
        async with asyncio.timeout(timeout_s):
            message = await websocket.receive_json()
    except (TimeoutError, ValueError, KeyError, WebSocketDisconnect):
        return None
    value = message.get("authorization") if isinstance(message, dict) else None
    if not isinstance(value, str):
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def authenticate_websocket(
    websocket: WebSocket, *, token: str | None, session: AsyncSession, services: Services
) -> Principal:
    """The principal of a WebSocket's credential, with the same failure throttle as REST and
    the route's rate budget charged (``job_reads`` for a job's event stream)."""
    address = client_address(websocket)
    if not token:
        await _failure_budget_left(services, address)
        await _count_failure(services, address)
        raise AuthenticationError("missing credentials: ?api_key=, ?access_token= or a first message")
    principal = await authenticate(token=token, session=session, services=services, address=address)
    route = getattr(websocket.scope.get("route"), "path", "")
    policy, limit = ratelimit.request_budget(services.settings, method="GET", route=route)
    await services.limiter.hit(limit, scope=policy, principal=principal.user_id)
    return principal
