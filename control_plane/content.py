"""Content: what users publish to the gallery, from one of their generations or uploaded.

Plain functions with a keyword-only ``session``; each ends its transaction before it returns.
Public content is visible to everyone signed in; private content to its creator alone (to
anyone else it does not exist: 404). Only the creator changes or deletes an item (an admin may
delete any, for moderation). The image is copied into the store under ``content/<id>.png``, so
the item outlives the generation it came from. The prompt's embedding (the served text
encoder's pooled output, :meth:`TritonGateway.embed_prompts`) is computed once at publish; when
Triton cannot be reached the item is published without it and the next refit fills it in.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
from sqlalchemy import Select, and_, or_, select

from sfumato.clients.triton_grpc import TritonCallError
from sfumato.control_plane import jobs, pagination, uploads
from sfumato.control_plane.auth import Principal
from sfumato.control_plane.models import ContentItem, new_id, utcnow
from sfumato.control_plane.pagination import Page
from sfumato.control_plane.recommend_schemas import ContentCreate, ContentUpdate
from sfumato.control_plane.services import Services
from sfumato.errors import ConflictError, NotFoundError, UsageError

log = logging.getLogger("sfumato.content")


def tag_index(tags: list[str]) -> str:
    return "|" + "".join(f"{t}|" for t in tags)


def visible_to(principal: Principal) -> object:
    return or_(ContentItem.visibility == "public", ContentItem.creator_id == principal.user_id)


async def embed(services: Services, prompt: str) -> bytes | None:
    """The prompt's embedding as float32 bytes, or ``None`` when Triton cannot make it now."""
    if not prompt.strip():
        return None
    try:
        vectors = await services.triton.embed_prompts([prompt])
    except TritonCallError as error:
        log.warning("embedding a prompt failed (the next refit retries): %s", error)
        return None
    return vectors[0].astype(np.float32).tobytes()


def _dedupe(tags: list[str]) -> list[str]:
    return list(dict.fromkeys(tags))


async def create_content(
    *, session, services: Services, principal: Principal, body: ContentCreate
) -> ContentItem:
    store = services.store
    fields: dict = {}
    if body.generation_id is not None:
        if body.image is not None:
            raise UsageError("image: give a generation_id or an image, not both", field="image")
        job = await jobs.read_job(session=session, principal=principal, job_id=body.generation_id)
        image = next((img for img in job.images if img.index == body.image_index), None)
        if image is None:
            if job.status != "succeeded":
                raise ConflictError(f"generation {job.id} is {job.status}; publish it once it succeeded")
            raise NotFoundError(f"generation {job.id} has no image {body.image_index}")
        data = await store.get(image.storage_key)
        prompt = str(job.params.get("prompt", ""))
        if body.prompt is not None and body.prompt != prompt:
            raise UsageError("prompt: comes from the generation; leave it out", field="prompt")
        fields = {
            "generation_id": job.id,
            "image_index": image.index,
            "seed": image.seed,
            "model_name": job.model_name,
            "model_version": job.model_version,
            "width": image.width,
            "height": image.height,
        }
    elif body.image is not None:
        if body.title is None:
            raise UsageError("title: required for an upload", field="title")
        upload = await uploads.read_image(
            body.image,
            field="image",
            mode="RGB",
            max_bytes=services.settings.max_image_bytes,
            max_pixels=services.settings.max_image_pixels,
        )
        data = upload.png
        prompt = body.prompt or ""
        fields = {"width": upload.width, "height": upload.height}
    else:
        raise UsageError("generation_id: give a generation_id (or upload an image)", field="generation_id")
    item_id = new_id()
    key = f"content/{item_id}.png"
    embedding = await embed(services, prompt)  # no transaction is open meanwhile
    await store.put(key, data)
    tags = _dedupe(body.tags)
    item = ContentItem(
        id=item_id,
        creator_id=principal.user_id,
        title=body.title or (prompt[:200] if prompt else "untitled"),
        prompt=prompt,
        tags=tags,
        tag_index=tag_index(tags),
        content_type=body.content_type,
        visibility=body.visibility,
        storage_key=key,
        sha256=hashlib.sha256(data).hexdigest(),
        embedding=embedding,
        **fields,
    )
    session.add(item)
    try:
        await session.commit()
    except BaseException:
        await session.rollback()
        await store.delete(key)
        raise
    return item


async def get_content(*, session, principal: Principal, content_id: str) -> ContentItem:
    """The item if the caller may see it (inside the caller's transaction)."""
    item = await session.get(ContentItem, content_id, populate_existing=True)
    if item is None or not (item.visibility == "public" or item.creator_id == principal.user_id):
        raise NotFoundError(f"no content {content_id}")
    return item


async def read_content(*, session, principal: Principal, content_id: str) -> ContentItem:
    try:
        return await get_content(session=session, principal=principal, content_id=content_id)
    finally:
        await session.commit()


async def _own(session, principal: Principal, content_id: str, *, admin_ok: bool = False) -> ContentItem:
    item = await get_content(session=session, principal=principal, content_id=content_id)
    if item.creator_id != principal.user_id and not (admin_ok and principal.is_admin):
        raise NotFoundError(f"no content {content_id} of yours")
    return item


async def update_content(
    *, session, principal: Principal, content_id: str, body: ContentUpdate
) -> ContentItem:
    item = await _own(session, principal, content_id)
    if body.title is not None:
        item.title = body.title
    if body.tags is not None:
        item.tags = _dedupe(body.tags)
        item.tag_index = tag_index(item.tags)
    if body.visibility is not None:
        item.visibility = body.visibility
    item.updated_at = utcnow()
    await session.commit()
    return await read_content(session=session, principal=principal, content_id=content_id)


async def delete_content(*, session, services: Services, principal: Principal, content_id: str) -> None:
    """Remove the item, its interactions and the recommendations of it (cascade), and its image."""
    item = await _own(session, principal, content_id, admin_ok=True)
    key = item.storage_key
    await session.delete(item)
    await session.commit()
    await services.store.delete(key)


async def list_content(
    *,
    session,
    principal: Principal,
    limit: int,
    cursor: str | None = None,
    sort: str = "recent",
    content_type: str | None = None,
    tag: str | None = None,
    creator: str | None = None,
    q: str | None = None,
) -> Page[ContentItem]:
    """Visible content, newest first (``recent``) or by engagement (``popular``), keyset pages."""
    query: Select = select(ContentItem).where(visible_to(principal))
    if content_type is not None:
        query = query.where(ContentItem.content_type == content_type)
    if tag is not None:
        query = query.where(ContentItem.tag_index.contains(f"|{tag.strip().lower()}|", autoescape=True))
    if creator is not None:
        query = query.where(ContentItem.creator_id == (principal.user_id if creator == "me" else creator))
    if q is not None and q.strip():
        needle = q.strip().lower()
        query = query.where(
            or_(
                ContentItem.title.icontains(needle, autoescape=True),
                ContentItem.prompt.icontains(needle, autoescape=True),
            )
        )
    if sort == "popular":
        if cursor is not None:
            after = pagination.decode_value_cursor(cursor)
            query = query.where(
                or_(
                    ContentItem.engagement < after.value,
                    and_(ContentItem.engagement == after.value, ContentItem.id < after.id),
                )
            )
        query = query.order_by(ContentItem.engagement.desc(), ContentItem.id.desc())
    else:
        if cursor is not None:
            at = pagination.decode_cursor(cursor)
            query = query.where(
                or_(
                    ContentItem.created_at < at.created_at,
                    and_(ContentItem.created_at == at.created_at, ContentItem.id < at.id),
                )
            )
        query = query.order_by(ContentItem.created_at.desc(), ContentItem.id.desc())
    rows = list((await session.scalars(query.limit(limit + 1))).all())
    await session.commit()
    items = rows[:limit]
    last = items[-1] if len(rows) > limit and items else None
    if last is None:
        return Page(items=items, next_cursor=None)
    if sort == "popular":
        return Page(items=items, next_cursor=pagination.encode_value_cursor(last.engagement, last.id))
    return Page(items=items, next_cursor=pagination.encode_cursor(last.created_at, last.id))
