"""Request and response bodies of the gallery and recommendation routes (issue 11): users and
their preferences, content, interactions, recommendations and their feedback."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator


def _no_nul(value: str) -> str:
    """PostgreSQL text cannot hold NUL: refused as bad input (422), not a database error (500)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
Tag = Annotated[
    str,
    StringConstraints(strip_whitespace=True, to_lower=True, min_length=1, max_length=32),
    AfterValidator(_no_nul),
]
ContentType = Literal["image"]
Visibility = Literal["public", "private"]
InteractionType = Literal["view", "like", "dislike", "download", "share", "rate"]
FeedbackKind = Literal["clicked", "dismissed", "liked"]
Sort = Literal["recent", "popular"]


# OpenAPI examples (each one valid for its model)
USEROUT_EXAMPLE: dict[str, Any] = {
    "id": "7d3f0c8e1a2b4c5d9e8f7a6b5c4d3e2f",
    "name": "alice",
    "role": "member",
    "display_name": "Alice",
    "bio": None,
    "created_at": "2026-11-23T10:00:00Z",
    "preferences": {
        "favorite_tags": ["red", "circle"],
        "content_types": ["image"],
        "settings": {"language": "en"},
    },
}
USERUPDATE_EXAMPLE: dict[str, Any] = {"display_name": "Alice", "bio": "I like red circles"}
PREFERENCES_EXAMPLE: dict[str, Any] = {
    "favorite_tags": ["red", "circle"],
    "content_types": ["image"],
    "settings": {"language": "en"},
}
CONTENTCREATE_EXAMPLE: dict[str, Any] = {
    "generation_id": "5f2c9a7e3b1d4f6a8c0e2b4d6f8a0c1e",
    "image_index": 0,
    "tags": ["red", "circle"],
}
CONTENTUPDATE_EXAMPLE: dict[str, Any] = {"title": "my red circle", "tags": ["red"], "visibility": "private"}
CONTENTOUT_EXAMPLE: dict[str, Any] = {
    "id": "c0ffee00c0ffee00c0ffee00c0ffee00",
    "creator": "7d3f0c8e1a2b4c5d9e8f7a6b5c4d3e2f",
    "title": "a red circle on a white background",
    "prompt": "a red circle on a white background",
    "tags": ["red", "circle"],
    "content_type": "image",
    "visibility": "public",
    "image_url": "/v1/content/c0ffee00c0ffee00c0ffee00c0ffee00/image",
    "width": 32,
    "height": 32,
    "generation_id": "5f2c9a7e3b1d4f6a8c0e2b4d6f8a0c1e",
    "seed": 1234,
    "model": {"name": "pipeline", "version": "1"},
    "counts": {
        "views": 12,
        "likes": 3,
        "dislikes": 0,
        "downloads": 1,
        "shares": 0,
        "ratings": 1,
        "rating_mean": 5.0,
    },
    "created_at": "2026-11-23T10:00:00Z",
    "updated_at": "2026-11-23T10:00:00Z",
}
CONTENTPAGE_EXAMPLE: dict[str, Any] = {
    "items": [
        {
            "id": "c0ffee00c0ffee00c0ffee00c0ffee00",
            "creator": "7d3f0c8e1a2b4c5d9e8f7a6b5c4d3e2f",
            "title": "a red circle on a white background",
            "prompt": "a red circle on a white background",
            "tags": ["red", "circle"],
            "content_type": "image",
            "visibility": "public",
            "image_url": "/v1/content/c0ffee00c0ffee00c0ffee00c0ffee00/image",
            "width": 32,
            "height": 32,
            "generation_id": "5f2c9a7e3b1d4f6a8c0e2b4d6f8a0c1e",
            "seed": 1234,
            "model": {"name": "pipeline", "version": "1"},
            "counts": {
                "views": 12,
                "likes": 3,
                "dislikes": 0,
                "downloads": 1,
                "shares": 0,
                "ratings": 1,
                "rating_mean": 5.0,
            },
            "created_at": "2026-11-23T10:00:00Z",
            "updated_at": "2026-11-23T10:00:00Z",
        }
    ],
    "next_cursor": None,
}
INTERACTIONCREATE_EXAMPLE: dict[str, Any] = {
    "content_id": "c0ffee00c0ffee00c0ffee00c0ffee00",
    "type": "rate",
    "rating": 5,
}
INTERACTIONOUT_EXAMPLE: dict[str, Any] = {
    "id": "1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d",
    "user": "7d3f0c8e1a2b4c5d9e8f7a6b5c4d3e2f",
    "content_id": "c0ffee00c0ffee00c0ffee00c0ffee00",
    "type": "like",
    "rating": None,
    "duration_s": None,
    "created_at": "2026-11-23T10:00:00Z",
}
INTERACTIONPAGE_EXAMPLE: dict[str, Any] = {
    "items": [
        {
            "id": "1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d",
            "user": "7d3f0c8e1a2b4c5d9e8f7a6b5c4d3e2f",
            "content_id": "c0ffee00c0ffee00c0ffee00c0ffee00",
            "type": "like",
            "rating": None,
            "duration_s": None,
            "created_at": "2026-11-23T10:00:00Z",
        }
    ],
    "next_cursor": None,
}
RECOMMENDATIONOUT_EXAMPLE: dict[str, Any] = {
    "id": "9f8e7d6c5b4a39281706f5e4d3c2b1a0",
    "content_id": "c0ffee00c0ffee00c0ffee00c0ffee00",
    "score": 1.84,
    "reason": "similar to content you liked",
    "algorithm": "hybrid-als8-te@20261123T100000",
    "rank": 0,
    "content": {
        "id": "c0ffee00c0ffee00c0ffee00c0ffee00",
        "creator": "7d3f0c8e1a2b4c5d9e8f7a6b5c4d3e2f",
        "title": "a red circle on a white background",
        "prompt": "a red circle on a white background",
        "tags": ["red", "circle"],
        "content_type": "image",
        "visibility": "public",
        "image_url": "/v1/content/c0ffee00c0ffee00c0ffee00c0ffee00/image",
        "width": 32,
        "height": 32,
        "generation_id": "5f2c9a7e3b1d4f6a8c0e2b4d6f8a0c1e",
        "seed": 1234,
        "model": {"name": "pipeline", "version": "1"},
        "counts": {
            "views": 12,
            "likes": 3,
            "dislikes": 0,
            "downloads": 1,
            "shares": 0,
            "ratings": 1,
            "rating_mean": 5.0,
        },
        "created_at": "2026-11-23T10:00:00Z",
        "updated_at": "2026-11-23T10:00:00Z",
    },
}
RECOMMENDATIONLIST_EXAMPLE: dict[str, Any] = {
    "items": [
        {
            "id": "9f8e7d6c5b4a39281706f5e4d3c2b1a0",
            "content_id": "c0ffee00c0ffee00c0ffee00c0ffee00",
            "score": 1.84,
            "reason": "similar to content you liked",
            "algorithm": "hybrid-als8-te@20261123T100000",
            "rank": 0,
            "content": {
                "id": "c0ffee00c0ffee00c0ffee00c0ffee00",
                "creator": "7d3f0c8e1a2b4c5d9e8f7a6b5c4d3e2f",
                "title": "a red circle on a white background",
                "prompt": "a red circle on a white background",
                "tags": ["red", "circle"],
                "content_type": "image",
                "visibility": "public",
                "image_url": "/v1/content/c0ffee00c0ffee00c0ffee00c0ffee00/image",
                "width": 32,
                "height": 32,
                "generation_id": "5f2c9a7e3b1d4f6a8c0e2b4d6f8a0c1e",
                "seed": 1234,
                "model": {"name": "pipeline", "version": "1"},
                "counts": {
                    "views": 12,
                    "likes": 3,
                    "dislikes": 0,
                    "downloads": 1,
                    "shares": 0,
                    "ratings": 1,
                    "rating_mean": 5.0,
                },
                "created_at": "2026-11-23T10:00:00Z",
                "updated_at": "2026-11-23T10:00:00Z",
            },
        }
    ],
    "algorithm": "hybrid-als8-te@20261123T100000",
    "computed_at": "2026-11-23T10:00:00Z",
}
FEEDBACK_EXAMPLE: dict[str, Any] = {"feedback": "clicked"}
REFITOUT_EXAMPLE: dict[str, Any] = {
    "algorithm": "hybrid-als8-te@20261123T100000",
    "users": 2000,
    "items": 2000,
    "interactions": 50000,
    "load_s": 1.8,
    "fit_s": 1.8,
    "refresh_s": 11.6,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# OpenAPI examples: alice (the users' example in schemas.py) publishes a generation of hers
# (GENERATION_OUT_EXAMPLE's id, seed and model), bob likes it, the recommender suggests it.
ALICE = "8d6f0e1c2b3a49588776655443322110"
BOB = "5e4d3c2b1a0948f7a6b5c4d3e2f1a0b9"
CONTENT_ID = "c0e1d2c3b4a5468798a9bacbdcedfe0f"
PREFERENCES_EXAMPLE = {
    "favorite_tags": ["red", "circle"],
    "content_types": ["image"],
    "settings": {"theme": "dark"},
}
USER_OUT_EXAMPLE = {
    "id": ALICE,
    "name": "alice",
    "role": "member",
    "display_name": "Alice",
    "bio": "Shapes and colours, mostly circles.",
    "created_at": "2026-11-22T10:00:00Z",
    "preferences": PREFERENCES_EXAMPLE,
}
CONTENT_OUT_EXAMPLE = {
    "id": CONTENT_ID,
    "creator": ALICE,
    "title": "Red circle",
    "prompt": "a red circle on a white background",
    "tags": ["red", "circle"],
    "content_type": "image",
    "visibility": "public",
    "image_url": f"/v1/content/{CONTENT_ID}/image",
    "width": 32,
    "height": 32,
    "generation_id": "3f0c1d0f5d8a4c6e9a7b2e1f0a9b8c7d",
    "seed": 42,
    "model": {"name": "pipeline", "version": "1"},
    "counts": {
        "views": 12,
        "likes": 3,
        "dislikes": 0,
        "downloads": 1,
        "shares": 0,
        "ratings": 2,
        "rating_mean": 4.5,
    },
    "created_at": "2026-11-22T10:05:00Z",
    "updated_at": "2026-11-22T10:05:00Z",
}
INTERACTION_OUT_EXAMPLE = {
    "id": "1a2b3c4d5e6f47788990aabbccddeeff",
    "user": BOB,
    "content_id": CONTENT_ID,
    "type": "like",
    "rating": None,
    "duration_s": None,
    "created_at": "2026-11-22T11:00:00Z",
}
ALGORITHM_EXAMPLE = "hybrid-als8-te@20261122T120000"
RECOMMENDATION_OUT_EXAMPLE = {
    "id": "f0e1d2c3b4a5469788796a5b4c3d2e1f",
    "content_id": CONTENT_ID,
    "score": 0.87,
    "reason": "similar to content you liked",
    "algorithm": ALGORITHM_EXAMPLE,
    "rank": 1,
    "content": CONTENT_OUT_EXAMPLE,
}


class UserOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [USEROUT_EXAMPLE]})
    id: str
    name: str
    role: str
    display_name: str | None
    bio: str | None
    created_at: datetime
    preferences: Preferences


class UserUpdate(_Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [USERUPDATE_EXAMPLE]})
    display_name: Text | None = Field(default=None, max_length=64)
    bio: Text | None = Field(default=None, max_length=500)


class Preferences(_Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [PREFERENCES_EXAMPLE]})
    favorite_tags: list[Tag] = Field(default_factory=list, max_length=32, examples=[["red", "circle"]])
    content_types: list[ContentType] = Field(default_factory=list, max_length=4)
    settings: dict[str, Any] = Field(default_factory=dict, description="free-form, at most 4 KiB as JSON")

    @model_validator(mode="after")
    def _small_settings(self) -> Preferences:
        import json

        text = json.dumps(self.settings)
        if len(text) > 4096:
            raise ValueError("settings: larger than 4096 bytes as JSON")
        if "\\u0000" in text:
            raise ValueError("settings: must not contain NUL characters")
        return self


class ContentCreate(_Strict):
    """From a generation (``generation_id`` + ``image_index``), or an upload (``image``)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [CONTENTCREATE_EXAMPLE]})

    generation_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    image_index: int = Field(default=0, ge=0, le=1000)
    image: str | None = Field(default=None, description="base64 PNG or JPEG (an upload)")
    title: Text | None = Field(default=None, min_length=1, max_length=200)
    prompt: Text | None = Field(default=None, max_length=1000)
    tags: list[Tag] = Field(default_factory=list, max_length=16)
    content_type: ContentType = "image"
    visibility: Visibility = "public"


class ContentUpdate(_Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [CONTENTUPDATE_EXAMPLE]})
    title: Text | None = Field(default=None, min_length=1, max_length=200)
    tags: list[Tag] | None = Field(default=None, max_length=16)
    visibility: Visibility | None = None


class Counts(BaseModel):
    views: int
    likes: int
    dislikes: int
    downloads: int
    shares: int
    ratings: int
    rating_mean: float | None


class ContentOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [CONTENTOUT_EXAMPLE]})
    id: str
    creator: str
    title: str
    prompt: str
    tags: list[str]
    content_type: str
    visibility: str
    image_url: str
    width: int
    height: int
    generation_id: str | None
    seed: int | None
    model: dict[str, str | None] | None
    counts: Counts
    created_at: datetime
    updated_at: datetime


class ContentPage(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [CONTENTPAGE_EXAMPLE]})
    items: list[ContentOut]
    next_cursor: str | None


class InteractionCreate(_Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [INTERACTIONCREATE_EXAMPLE]})
    content_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    type: InteractionType
    rating: int | None = Field(default=None, ge=1, le=5, description="1-5, for `rate` only")
    duration_s: float | None = Field(default=None, ge=0, le=86400, description="for `view` only")

    @model_validator(mode="after")
    def _fields_for_type(self) -> InteractionCreate:
        if self.type == "rate" and self.rating is None:
            raise ValueError("rating: required for type rate")
        if self.type != "rate" and self.rating is not None:
            raise ValueError("rating: only for type rate")
        if self.type != "view" and self.duration_s is not None:
            raise ValueError("duration_s: only for type view")
        return self


class InteractionOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [INTERACTIONOUT_EXAMPLE]})
    id: str
    user: str
    content_id: str
    type: str
    rating: int | None
    duration_s: float | None
    created_at: datetime


class InteractionPage(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [INTERACTIONPAGE_EXAMPLE]})
    items: list[InteractionOut]
    next_cursor: str | None


class RecommendationOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [RECOMMENDATIONOUT_EXAMPLE]})
    id: str
    content_id: str
    score: float
    reason: str
    algorithm: str
    rank: int
    content: ContentOut


class RecommendationList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [RECOMMENDATIONLIST_EXAMPLE]})
    items: list[RecommendationOut]
    algorithm: str | None
    computed_at: datetime | None


class Feedback(_Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [FEEDBACK_EXAMPLE]})
    feedback: FeedbackKind


class RefitOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [REFITOUT_EXAMPLE]})
    algorithm: str
    users: int
    items: int
    interactions: int
    load_s: float
    fit_s: float
    refresh_s: float


UserOut.model_rebuild()
