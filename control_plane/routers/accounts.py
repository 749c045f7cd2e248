"""``/v1/auth/token``, ``/v1/users`` (admin) and ``/v1/keys``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from sfumato.control_plane import accounts, auth
from sfumato.control_plane.auth import AdminPrincipal, CurrentPrincipal
from sfumato.control_plane.deps import ReadSessionDep, ServicesDep, SessionDep
from sfumato.control_plane.models import ApiKey, User
from sfumato.control_plane.problems import FORBIDDEN, NOT_FOUND, PROBLEM_RESPONSES, problem_response
from sfumato.control_plane.schemas import (
    KeyCreate,
    KeyCreated,
    KeyOut,
    TokenRequest,
    TokenResponse,
    UserCreate,
    UserOut,
)

router = APIRouter(tags=["auth"], responses=PROBLEM_RESPONSES)
KeyId = Annotated[str, Path(min_length=1, max_length=16)]
UserId = Annotated[str, Path(min_length=1, max_length=64)]


def _user_out(user: User) -> UserOut:
    return UserOut(
        id=user.id,
        name=user.name,
        role=user.role,
        created_at=user.created_at,
        disabled=user.disabled_at is not None,
    )


def _key_out(key: ApiKey) -> KeyOut:
    return KeyOut(
        id=key.id,
        user_id=key.user_id,
        name=key.name,
        created_at=key.created_at,
        last_used_at=key.last_used_at,
        revoked=key.revoked_at is not None,
    )


@router.post(
    "/v1/auth/token", response_model=TokenResponse, summary="Exchange a user name and password for a JWT"
)
async def token(
    body: TokenRequest, request: Request, session: ReadSessionDep, services: ServicesDep
) -> TokenResponse:
    access, ttl_s = await auth.login(
        session=session,
        services=services,
        name=body.username,
        password=body.password,
        address=auth.client_address(request),
    )
    return TokenResponse(access_token=access, expires_in=ttl_s)


@router.post(
    "/v1/users",
    response_model=UserOut,
    status_code=201,
    summary="Create a user (admin)",
    responses={
        **FORBIDDEN,
        **problem_response(409, "Conflict", "The name is taken", "a user named 'alice' already exists"),
    },
)
async def create_user(body: UserCreate, _: AdminPrincipal, session: SessionDep) -> UserOut:
    user = await accounts.create_user(session=session, name=body.name, role=body.role, password=body.password)
    return _user_out(user)


@router.get("/v1/users", response_model=list[UserOut], summary="List users (admin)", responses=FORBIDDEN)
async def list_users(_: AdminPrincipal, session: SessionDep) -> list[UserOut]:
    return [_user_out(u) for u in await accounts.list_users(session=session)]


@router.post(
    "/v1/users/{user_id}/keys",
    response_model=KeyCreated,
    status_code=201,
    summary="Create an API key for a user (admin)",
    responses={**FORBIDDEN, **NOT_FOUND},
)
async def create_key_for(
    user_id: UserId, body: KeyCreate, _: AdminPrincipal, session: SessionDep
) -> KeyCreated:
    await accounts.get_user(session=session, user_id=user_id)
    key, plaintext = await accounts.create_key(session=session, user_id=user_id, name=body.name)
    return KeyCreated(**_key_out(key).model_dump(), key=plaintext)


@router.post("/v1/keys", response_model=KeyCreated, status_code=201, summary="Create an API key for yourself")
async def create_own_key(body: KeyCreate, principal: CurrentPrincipal, session: SessionDep) -> KeyCreated:
    key, plaintext = await accounts.create_key(session=session, user_id=principal.user_id, name=body.name)
    return KeyCreated(**_key_out(key).model_dump(), key=plaintext)


@router.get("/v1/keys", response_model=list[KeyOut], summary="List your API keys")
async def list_own_keys(principal: CurrentPrincipal, session: SessionDep) -> list[KeyOut]:
    return [_key_out(k) for k in await accounts.list_keys(session=session, user_id=principal.user_id)]


@router.delete(
    "/v1/keys/{key_id}",
    status_code=204,
    summary="Revoke an API key (yours; any for admins)",
    responses=NOT_FOUND,
)
async def revoke_key(key_id: KeyId, principal: CurrentPrincipal, session: SessionDep) -> Response:
    await accounts.revoke_key(
        session=session, key_id=key_id, owner_id=None if principal.is_admin else principal.user_id
    )
    return Response(status_code=204)
