"""Users and API keys: plain functions with a keyword-only session (CLI and routers share them).

Password hashing (argon2, tens of milliseconds of CPU by design) runs in a worker thread, never on
the event loop.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from sfumato.control_plane.models import ApiKey, User, utcnow
from sfumato.control_plane.security import generate_api_key, hash_password, verify_password
from sfumato.errors import AuthenticationError, ConflictError, NotFoundError, UsageError

ROLES = ("admin", "member", "trainer")  # trainer: a member who may also train models


async def get_user_by_name(*, session: AsyncSession, name: str) -> User | None:
    return await session.scalar(select(User).where(User.name == name))


async def get_user(*, session: AsyncSession, user_id: str) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise NotFoundError(f"no user {user_id}")
    return user


async def list_users(*, session: AsyncSession) -> list[User]:
    return list((await session.scalars(select(User).order_by(User.created_at))).all())


async def list_keys(*, session: AsyncSession, user_id: str) -> list[ApiKey]:
    return list(
        (
            await session.scalars(select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.created_at))
        ).all()
    )


async def create_user(
    *, session: AsyncSession, name: str, role: str = "member", password: str | None = None
) -> User:
    if role not in ROLES:
        raise UsageError(f"role: must be one of {', '.join(ROLES)}", field="role")
    password_hash = await asyncio.to_thread(hash_password, password) if password else None
    user = User(name=name, role=role, password_hash=password_hash)
    session.add(user)
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise ConflictError(f"a user named {name!r} already exists") from None
    return user


async def ensure_user(*, session: AsyncSession, name: str, role: str) -> User:
    """The user called ``name``, created with ``role`` if missing (``sfumato admin create-key``)."""
    user = await get_user_by_name(session=session, name=name)
    if user is not None:
        return user
    try:
        return await create_user(session=session, name=name, role=role)
    except ConflictError:  # created concurrently
        user = await get_user_by_name(session=session, name=name)
        assert user is not None
        return user


async def create_key(*, session: AsyncSession, user_id: str, name: str = "") -> tuple[ApiKey, str]:
    """A new API key for the user; returns the row and the plaintext key (shown once)."""
    new = generate_api_key()
    key = ApiKey(id=new.lookup_id, user_id=user_id, name=name, secret_hash=new.secret_hash)
    session.add(key)
    await session.commit()
    return key, new.plaintext


async def revoke_key(*, session: AsyncSession, key_id: str, owner_id: str | None) -> ApiKey:
    """Revoke a key; ``owner_id`` restricts to that user's keys (``None``: any, for admins)."""
    key = await session.get(ApiKey, key_id)
    if key is None or (owner_id is not None and key.user_id != owner_id):
        raise NotFoundError(f"no API key {key_id}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        await session.commit()
    return key


async def authenticate(*, session: AsyncSession, name: str, password: str) -> User:
    user = await get_user_by_name(session=session, name=name)
    if (
        not await asyncio.to_thread(verify_password, password, user.password_hash if user else None)
        or user is None
    ):
        raise AuthenticationError("wrong user name or password")
    if user.disabled_at is not None:
        raise AuthenticationError("this user is disabled")
    return user


async def bootstrap_admin(*, session: AsyncSession, name: str = "admin") -> str | None:
    """On a database without users, create the admin user and return its first API key (else None)."""
    if (await session.scalar(select(func.count()).select_from(User))) or 0:
        return None
    user = await ensure_user(session=session, name=name, role="admin")
    _, plaintext = await create_key(session=session, user_id=user.id, name="first start")
    return plaintext
