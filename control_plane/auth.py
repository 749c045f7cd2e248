"""Who is calling: ``Authorization: Bearer`` with an API key (``sfm_...``) or a JWT."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

import jwt
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from sfumato.control_plane.deps import get_services, get_session
from sfumato.control_plane.models import ApiKey, User, utcnow
from sfumato.control_plane.security import decode_token, secret_matches, split_api_key
from sfumato.control_plane.services import Services
from sfumato.errors import AuthenticationError, PermissionDeniedError

LAST_USED_RESOLUTION = timedelta(seconds=60)
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


async def _from_api_key(token: str, session: AsyncSession) -> Principal:
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
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        # One write a minute per key, not one per request (SQLite has a single writer).
        await session.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
    await session.commit()
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
    :class:`AuthenticationError`. REST (:func:`get_principal`) and the gRPC edge share it."""
    if token.startswith("sfm_"):
        return await _from_api_key(token, session)
    return await _from_token(token, session, services)


async def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    session: Annotated[AsyncSession, Depends(get_session)],
    services: Annotated[Services, Depends(get_services)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise AuthenticationError("missing bearer credentials (an API key or an access token)")
    principal = await authenticate_bearer(credentials.credentials, session=session, services=services)
    request.state.principal = principal
    await services.limiter.hit(services.settings.rate_limit, scope="requests", principal=principal.user_id)
    return principal


async def require_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.is_admin:
        raise PermissionDeniedError("this action needs the admin role")
    return principal


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]
AdminPrincipal = Annotated[Principal, Depends(require_admin)]
