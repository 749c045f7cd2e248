"""Interactions: what users do with content (``POST /v1/interactions``).

A like, a dislike and a rating are *states*: one row per (user, content, slot), where like and
dislike share the slot ``reaction`` (a dislike replaces a like) and a rating has its own;
posting the same state again changes nothing (``created`` is false: 200, not 201). A view, a
download, a share are *events*: every one is a row. Interactions are only on content the user
can see. Each one updates the item's counts in the same transaction and marks the user's
recommendations stale (:func:`touch_user`), so that their next read recomputes them.
"""

from __future__ import annotations

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError

from sfumato.control_plane import content, pagination
from sfumato.control_plane.auth import Principal
from sfumato.control_plane.models import STATE_SLOTS, ContentItem, Interaction, RecommenderState, utcnow
from sfumato.control_plane.pagination import Page
from sfumato.control_plane.recommender.hybrid import interaction_weight
from sfumato.errors import NotFoundError

COUNTER = {
    "view": "views",
    "like": "likes",
    "dislike": "dislikes",
    "download": "downloads",
    "share": "shares",
    "rate": "ratings",
}


async def touch_user(session, user_id: str) -> None:
    """Mark ``user_id``'s recommendations stale (inside the caller's transaction)."""
    now = utcnow()
    result = await session.execute(
        update(RecommenderState).where(RecommenderState.user_id == user_id).values(changed_at=now)
    )
    if result.rowcount == 0:
        try:
            async with session.begin_nested():
                session.add(RecommenderState(user_id=user_id, changed_at=now))
        except IntegrityError:  # made meanwhile by a concurrent request: update it
            await session.execute(
                update(RecommenderState).where(RecommenderState.user_id == user_id).values(changed_at=now)
            )


def _delta(kind: str, rating: int | None, sign: int) -> dict:
    """The counter changes for adding (sign 1) or removing (-1) one interaction."""
    values: dict = {}
    column = COUNTER.get(kind)
    if column is not None:
        values[column] = getattr(ContentItem, column) + sign
    if kind == "rate":
        values["rating_sum"] = ContentItem.rating_sum + sign * int(rating or 0)
    values["engagement"] = ContentItem.engagement + sign * int(interaction_weight(kind, rating))
    return values


async def _count(session, content_id: str, kind: str, rating: int | None, sign: int) -> None:
    await session.execute(
        update(ContentItem).where(ContentItem.id == content_id).values(**_delta(kind, rating, sign))
    )


async def record(
    session,
    *,
    principal: Principal,
    content_id: str,
    kind: str,
    rating: int | None = None,
    duration_s: float | None = None,
    recommendation_id: str | None = None,
) -> tuple[Interaction, bool]:
    """Record one interaction inside the caller's transaction (not committed); ``(row, created)``."""
    await content.get_content(session=session, principal=principal, content_id=content_id)
    slot = STATE_SLOTS.get(kind)
    if slot is not None:
        existing = await session.scalar(
            select(Interaction).where(
                Interaction.user_id == principal.user_id,
                Interaction.content_id == content_id,
                Interaction.slot == slot,
            )
        )
        if existing is not None:
            if existing.type == kind and existing.rating == rating:
                return existing, False
            await _count(session, content_id, existing.type, existing.rating, -1)
            existing.type, existing.rating, existing.created_at = kind, rating, utcnow()
            await _count(session, content_id, kind, rating, 1)
            await touch_user(session, principal.user_id)
            return existing, True
    row = Interaction(
        user_id=principal.user_id,
        content_id=content_id,
        type=kind,
        slot=slot,
        rating=rating,
        duration_s=duration_s,
        recommendation_id=recommendation_id,
    )
    session.add(row)
    await session.flush()
    if kind != "dismiss":
        await _count(session, content_id, kind, rating, 1)
    await touch_user(session, principal.user_id)
    return row, True


async def create_interaction(
    *,
    session,
    principal: Principal,
    content_id: str,
    kind: str,
    rating: int | None = None,
    duration_s: float | None = None,
) -> tuple[Interaction, bool]:
    """Record an interaction and commit; a concurrent duplicate state answers with the winner."""
    try:
        row, created = await record(
            session,
            principal=principal,
            content_id=content_id,
            kind=kind,
            rating=rating,
            duration_s=duration_s,
        )
        await session.commit()
    except IntegrityError:  # the same state was recorded concurrently
        await session.rollback()
        row, created = await record(
            session,
            principal=principal,
            content_id=content_id,
            kind=kind,
            rating=rating,
            duration_s=duration_s,
        )
        await session.commit()
    return row, created


async def read_interaction(*, session, principal: Principal, interaction_id: str) -> Interaction:
    """One of the caller's interactions (anyone else's: 404)."""
    try:
        row = await session.get(Interaction, interaction_id)
        if row is None or row.user_id != principal.user_id:
            raise NotFoundError(f"no interaction {interaction_id}")
        return row
    finally:
        await session.commit()


async def list_interactions(
    *, session, user_id: str, limit: int, cursor: str | None, kind: str | None = None
) -> Page[Interaction]:
    """``user_id``'s interactions, newest first (the caller checked who may read them)."""
    query = select(Interaction).where(Interaction.user_id == user_id)
    if kind is not None:
        query = query.where(Interaction.type == kind)
    if cursor is not None:
        at = pagination.decode_cursor(cursor)
        query = query.where(
            or_(
                Interaction.created_at < at.created_at,
                and_(Interaction.created_at == at.created_at, Interaction.id < at.id),
            )
        )
    rows = list(
        (
            await session.scalars(
                query.order_by(Interaction.created_at.desc(), Interaction.id.desc()).limit(limit + 1)
            )
        ).all()
    )
    await session.commit()
    items = rows[:limit]
    last = items[-1] if len(rows) > limit and items else None
    return Page(items=items, next_cursor=pagination.encode_cursor(last.created_at, last.id) if last else None)
