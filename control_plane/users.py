"""Users as the gallery sees them: profile, preferences, and who may read or change them.

``me`` stands for the caller in every ``/v1/users/{id}`` route. A user reads and changes their
own record; an admin any; anyone else's is 404. Favourite tags are embedded by the served text
encoder when they are set (the cold-start half of the recommender's content part).
"""

from __future__ import annotations

from sfumato.control_plane import content
from sfumato.control_plane.auth import Principal
from sfumato.control_plane.interactions import touch_user
from sfumato.control_plane.models import Profile, User, utcnow
from sfumato.control_plane.recommend_schemas import Preferences, UserUpdate
from sfumato.control_plane.services import Services
from sfumato.errors import NotFoundError


def resolve(principal: Principal, user_id: str) -> str:
    """The id ``user_id`` names (``me``: the caller), if the caller may act on it; else 404."""
    target = principal.user_id if user_id == "me" else user_id
    if target != principal.user_id and not principal.is_admin:
        raise NotFoundError(f"no user {user_id}")
    return target


async def _load(session, user_id: str) -> tuple[User, Profile | None]:
    user = await session.get(User, user_id)
    if user is None:
        raise NotFoundError(f"no user {user_id}")
    return user, await session.get(Profile, user_id, populate_existing=True)


async def read_user(*, session, principal: Principal, user_id: str) -> tuple[User, Profile | None]:
    try:
        return await _load(session, resolve(principal, user_id))
    finally:
        await session.commit()


async def _profile(session, user_id: str) -> tuple[User, Profile]:
    user, profile = await _load(session, user_id)
    if profile is None:
        profile = Profile(user_id=user_id, favorite_tags=[], content_types=[], settings={})
        session.add(profile)
    return user, profile


async def update_user(
    *, session, principal: Principal, user_id: str, body: UserUpdate
) -> tuple[User, Profile | None]:
    target = resolve(principal, user_id)
    _, profile = await _profile(session, target)
    for name in body.model_fields_set:
        setattr(profile, name, getattr(body, name))
    profile.updated_at = utcnow()
    await session.commit()
    return await read_user(session=session, principal=principal, user_id=target)


async def put_preferences(
    *, session, services: Services, principal: Principal, user_id: str, body: Preferences
) -> tuple[User, Profile | None]:
    target = resolve(principal, user_id)
    await _load(session, target)  # 404 before any work
    await session.commit()
    tags = list(dict.fromkeys(body.favorite_tags))
    vector = await content.embed(services, " ".join(tags)) if tags else None  # no transaction open
    _, profile = await _profile(session, target)
    profile.favorite_tags = tags
    profile.content_types = list(dict.fromkeys(body.content_types))
    profile.settings = body.settings
    profile.preference_embedding = vector
    profile.updated_at = utcnow()
    await touch_user(session, target)
    await session.commit()
    return await read_user(session=session, principal=principal, user_id=target)
