"""``/v1/users``, ``/v1/content``, ``/v1/interactions`` and ``/v1/recommendations``: the gallery
and its recommender (issue 11). Thin: queries and commits live in :mod:`~sfumato.control_plane.users`,
:mod:`~sfumato.control_plane.content`, :mod:`~sfumato.control_plane.interactions` and
:mod:`~sfumato.control_plane.recommendations`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Response
from fastapi.responses import JSONResponse, StreamingResponse

from sfumato.control_plane import content, interactions, recommendations, users
from sfumato.control_plane.auth import AdminPrincipal, CurrentPrincipal
from sfumato.control_plane.deps import ServicesDep, SessionDep
from sfumato.control_plane.models import ContentItem, Interaction, Profile, Recommendation, User
from sfumato.control_plane.problems import FORBIDDEN, NOT_FOUND, PROBLEM_RESPONSES, problem_response
from sfumato.control_plane.recommend_schemas import (
    ContentCreate,
    ContentOut,
    ContentPage,
    ContentType,
    ContentUpdate,
    Counts,
    Feedback,
    InteractionCreate,
    InteractionOut,
    InteractionPage,
    InteractionType,
    Preferences,
    RecommendationList,
    RecommendationOut,
    RefitOut,
    Sort,
    UserOut,
    UserUpdate,
)
from sfumato.errors import NotFoundError

router = APIRouter(prefix="/v1", responses=PROBLEM_RESPONSES)
_ID = r"^[^\x00]{1,64}$"  # no NUL: PostgreSQL text cannot hold it (422, not a 500)
_NO_NUL = r"^[^\x00]*$"
Id = Annotated[str, Path(pattern=_ID)]
UserId = Annotated[str, Path(pattern=_ID, description="a user's id, or `me`")]
Cursor = Annotated[str | None, Query(max_length=200, description="`next_cursor` of the previous page")]


def user_out(user: User, profile: Profile | None) -> UserOut:
    return UserOut(
        id=user.id,
        name=user.name,
        role=user.role,
        display_name=profile.display_name if profile else None,
        bio=profile.bio if profile else None,
        created_at=user.created_at,
        preferences=Preferences(
            favorite_tags=profile.favorite_tags if profile else [],
            content_types=profile.content_types if profile else [],
            settings=profile.settings if profile else {},
        ),
    )


def content_out(item: ContentItem) -> ContentOut:
    return ContentOut(
        id=item.id,
        creator=item.creator_id,
        title=item.title,
        prompt=item.prompt,
        tags=item.tags,
        content_type=item.content_type,
        visibility=item.visibility,
        image_url=f"/v1/content/{item.id}/image",
        width=item.width,
        height=item.height,
        generation_id=item.generation_id,
        seed=item.seed,
        model={"name": item.model_name, "version": item.model_version} if item.model_name else None,
        counts=Counts(
            views=item.views,
            likes=item.likes,
            dislikes=item.dislikes,
            downloads=item.downloads,
            shares=item.shares,
            ratings=item.ratings,
            rating_mean=item.rating_sum / item.ratings if item.ratings else None,
        ),
        created_at=item.created_at,
        updated_at=item.updated_at,
    )


def interaction_out(row: Interaction) -> InteractionOut:
    return InteractionOut(
        id=row.id,
        user=row.user_id,
        content_id=row.content_id,
        type=row.type,
        rating=row.rating,
        duration_s=row.duration_s,
        created_at=row.created_at,
    )


# --------------------------------------------------------------------------- users


@router.get("/users/{user_id}", response_model=UserOut, tags=["users"], responses=NOT_FOUND)
async def get_user(user_id: UserId, principal: CurrentPrincipal, session: SessionDep) -> UserOut:
    """Yourself (`me`), or anyone for an admin."""
    return user_out(*await users.read_user(session=session, principal=principal, user_id=user_id))


@router.put("/users/{user_id}", response_model=UserOut, tags=["users"], responses=NOT_FOUND)
async def put_user(
    user_id: UserId, body: UserUpdate, principal: CurrentPrincipal, session: SessionDep
) -> UserOut:
    return user_out(
        *await users.update_user(session=session, principal=principal, user_id=user_id, body=body)
    )


@router.put("/users/{user_id}/preferences", response_model=UserOut, tags=["users"], responses=NOT_FOUND)
async def put_preferences(
    user_id: UserId,
    body: Preferences,
    principal: CurrentPrincipal,
    session: SessionDep,
    services: ServicesDep,
) -> UserOut:
    """Favourite tags, content types and free-form settings; the tags steer a new user's
    recommendations (embedded by the served text encoder)."""
    return user_out(
        *await users.put_preferences(
            session=session, services=services, principal=principal, user_id=user_id, body=body
        )
    )


@router.get(
    "/users/{user_id}/interactions",
    response_model=InteractionPage,
    tags=["interactions"],
    responses=NOT_FOUND,
)
async def list_user_interactions(
    user_id: UserId,
    principal: CurrentPrincipal,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Cursor = None,
    type: Annotated[InteractionType | None, Query(description="only this type")] = None,
) -> InteractionPage:
    target = users.resolve(principal, user_id)
    page = await interactions.list_interactions(
        session=session, user_id=target, limit=limit, cursor=cursor, kind=type
    )
    return InteractionPage(items=[interaction_out(r) for r in page.items], next_cursor=page.next_cursor)


# --------------------------------------------------------------------------- content


@router.get("/content", response_model=ContentPage, tags=["content"])
async def list_content(
    principal: CurrentPrincipal,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Cursor = None,
    sort: Sort = "recent",
    content_type: ContentType | None = None,
    tag: Annotated[str | None, Query(min_length=1, max_length=32, pattern=_NO_NUL)] = None,
    creator: Annotated[str | None, Query(pattern=_ID, description="a user id, or `me`")] = None,
    q: Annotated[
        str | None,
        Query(min_length=1, max_length=200, pattern=_NO_NUL, description="in the title or prompt"),
    ] = None,
) -> ContentPage:
    """Public content and your own private content; newest first or most engaging first."""
    page = await content.list_content(
        session=session,
        principal=principal,
        limit=limit,
        cursor=cursor,
        sort=sort,
        content_type=content_type,
        tag=tag,
        creator=creator,
        q=q,
    )
    return ContentPage(items=[content_out(i) for i in page.items], next_cursor=page.next_cursor)


@router.post(
    "/content",
    response_model=ContentOut,
    status_code=201,
    tags=["content"],
    responses={
        **NOT_FOUND,
        **problem_response(
            409,
            "Conflict",
            "Generation not finished",
            "generation 5f2c... is queued; publish it once it succeeded",
        ),
        **problem_response(413, "Payload too large", "Image too large", "image: larger than 4194304 bytes"),
    },
)
async def create_content(
    body: ContentCreate, principal: CurrentPrincipal, session: SessionDep, services: ServicesDep
) -> JSONResponse:
    """Publish one image of your generation (`generation_id`, `image_index`: its prompt, seed and
    model come along), or upload one (`image`, `title`, optional `prompt`)."""
    item = await content.create_content(session=session, services=services, principal=principal, body=body)
    return JSONResponse(
        content_out(item).model_dump(mode="json"),
        status_code=201,
        headers={"Location": f"/v1/content/{item.id}"},
    )


@router.get("/content/{content_id}", response_model=ContentOut, tags=["content"], responses=NOT_FOUND)
async def get_content(content_id: Id, principal: CurrentPrincipal, session: SessionDep) -> ContentOut:
    return content_out(
        await content.read_content(session=session, principal=principal, content_id=content_id)
    )


@router.put("/content/{content_id}", response_model=ContentOut, tags=["content"], responses=NOT_FOUND)
async def put_content(
    content_id: Id, body: ContentUpdate, principal: CurrentPrincipal, session: SessionDep
) -> ContentOut:
    """Title, tags, visibility (your own content only)."""
    item = await content.update_content(
        session=session, principal=principal, content_id=content_id, body=body
    )
    return content_out(item)


@router.delete("/content/{content_id}", status_code=204, tags=["content"], responses=NOT_FOUND)
async def delete_content(
    content_id: Id, principal: CurrentPrincipal, session: SessionDep, services: ServicesDep
) -> Response:
    await content.delete_content(
        session=session, services=services, principal=principal, content_id=content_id
    )
    return Response(status_code=204)


@router.get(
    "/content/{content_id}/image",
    tags=["content"],
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "the PNG"},
        **NOT_FOUND,
        304: {"description": "Not modified (If-None-Match)"},
    },
)
async def get_content_image(
    content_id: Id,
    principal: CurrentPrincipal,
    session: SessionDep,
    services: ServicesDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    item = await content.read_content(session=session, principal=principal, content_id=content_id)
    etag = f'"{item.sha256}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"}
    if if_none_match and etag in [t.strip().removeprefix("W/") for t in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)
    try:
        reader = await services.store.open(item.storage_key)
    except FileNotFoundError:
        raise NotFoundError(f"the image of content {content_id} is missing from the store") from None
    headers["Content-Length"] = str(reader.size)
    return StreamingResponse(reader.chunks(), media_type="image/png", headers=headers)


# --------------------------------------------------------------------------- interactions


@router.post(
    "/interactions",
    response_model=InteractionOut,
    status_code=201,
    tags=["interactions"],
    responses={
        200: {"description": "the same state was already recorded", "model": InteractionOut},
        **NOT_FOUND,
    },
)
async def create_interaction(
    body: InteractionCreate, principal: CurrentPrincipal, session: SessionDep
) -> JSONResponse:
    """A like, dislike or rating is a state (posting it again changes nothing: 200); a view,
    download or share is an event (each one counts: 201)."""
    row, created = await interactions.create_interaction(
        session=session,
        principal=principal,
        content_id=body.content_id,
        kind=body.type,
        rating=body.rating,
        duration_s=body.duration_s,
    )
    return JSONResponse(
        interaction_out(row).model_dump(mode="json"),
        status_code=201 if created else 200,
        headers={"Location": f"/v1/interactions/{row.id}"},
    )


@router.get(
    "/interactions/{interaction_id}",
    response_model=InteractionOut,
    tags=["interactions"],
    responses=NOT_FOUND,
)
async def get_interaction(
    interaction_id: Id, principal: CurrentPrincipal, session: SessionDep
) -> InteractionOut:
    return interaction_out(
        await interactions.read_interaction(
            session=session, principal=principal, interaction_id=interaction_id
        )
    )


# --------------------------------------------------------------------------- recommendations


def recommendation_out(row: Recommendation, item: ContentItem) -> RecommendationOut:
    return RecommendationOut(
        id=row.id,
        content_id=row.content_id,
        score=row.score,
        reason=row.reason,
        algorithm=row.algorithm,
        rank=row.rank,
        content=content_out(item),
    )


@router.get(
    "/users/{user_id}/recommendations",
    response_model=RecommendationList,
    tags=["recommendations"],
    responses=NOT_FOUND,
)
async def get_recommendations(
    user_id: UserId,
    principal: CurrentPrincipal,
    session: SessionDep,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> Response:
    """Precomputed rows, best first; recomputed for you first when you interacted since."""
    rows, state = await recommendations.list_recommendations(
        session=session, services=services, principal=principal, user_id=user_id, limit=limit
    )
    body = RecommendationList(
        items=[recommendation_out(r, c) for r, c in rows],
        algorithm=state.algorithm if state else None,
        computed_at=state.computed_at if state else None,
    )
    # Serialised once, here (the hot read: FastAPI would validate the model a second time).
    return Response(body.model_dump_json(), media_type="application/json")


@router.post(
    "/recommendations/generate",
    response_model=RefitOut,
    tags=["recommendations"],
    summary="Refit the recommender and refresh every user's rows (admin)",
    responses=FORBIDDEN,
)
async def generate_recommendations(principal: AdminPrincipal, services: ServicesDep) -> RefitOut:
    """Refit the recommender now and refresh every user's rows (admin)."""
    report = await recommendations.refit(services=services)
    return RefitOut(
        algorithm=report.algorithm,
        users=report.users,
        items=report.items,
        interactions=report.interactions,
        load_s=report.load_s,
        fit_s=report.fit_s,
        refresh_s=report.refresh_s,
    )


@router.put(
    "/recommendations/{recommendation_id}/feedback",
    response_model=RecommendationOut,
    tags=["recommendations"],
    responses=NOT_FOUND,
)
async def put_feedback(
    recommendation_id: Id, body: Feedback, principal: CurrentPrincipal, session: SessionDep
) -> RecommendationOut:
    """`clicked`, `dismissed` or `liked`: stored, and counted as an interaction (view, dismiss, like)."""
    row = await recommendations.feedback(
        session=session, principal=principal, recommendation_id=recommendation_id, kind=body.feedback
    )
    item = await content.read_content(session=session, principal=principal, content_id=row.content_id)
    return recommendation_out(row, item)
