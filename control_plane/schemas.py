"""Request and response bodies of the REST API (Pydantic v2), with OpenAPI examples."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sfumato.serving.request import MAX_SEED
from sfumato.serving.schedulers import SCHEDULERS

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
SchedulerName = Literal["ddim", "euler", "euler_a", "dpmpp_2m"]
assert set(SCHEDULERS) == {"ddim", "euler", "euler_a", "dpmpp_2m"}

GENERATION_EXAMPLE = {
    "prompt": "a red circle on a white background",
    "num_images": 2,
    "steps": 25,
    "guidance_scale": 5.0,
    "seed": 42,
}


class GenerationCreate(BaseModel):
    """A text-to-image (or img2img / inpainting) request. Unset fields take the model's defaults."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [GENERATION_EXAMPLE]})

    prompt: str = Field(min_length=1, max_length=2000, description="what to draw")
    negative_prompt: str | None = Field(default=None, max_length=2000)
    num_images: int = Field(default=1, ge=1, le=8)
    steps: int | None = Field(default=None, ge=1, le=150)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=50.0, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    width: int | None = Field(default=None, ge=8, le=4096)
    height: int | None = Field(default=None, ge=8, le=4096)
    scheduler: SchedulerName | None = None
    image: str | None = Field(default=None, description="img2img / inpainting source: base64 PNG or JPEG")
    mask: str | None = Field(default=None, description="inpainting mask: base64 PNG, white = repaint")
    strength: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"{value} is not a multiple of 8")
        return value


class ImageOut(BaseModel):
    index: int
    url: str
    seed: int
    width: int
    height: int
    sha256: str


class Timings(BaseModel):
    queued_s: float | None = Field(description="from submission to the (last) claim")
    inference_s: float | None = Field(description="the Triton pipeline call")
    total_s: float | None = Field(description="from submission to the final status")


GENERATION_OUT_EXAMPLE = {
    "id": "3f0c1d0f5d8a4c6e9a7b2e1f0a9b8c7d",
    "status": "succeeded",
    "progress": 1.0,
    "params": GENERATION_EXAMPLE,
    "model": {"name": "pipeline", "version": "1"},
    "attempts": 1,
    "error": None,
    "created_at": "2026-11-22T10:00:00Z",
    "started_at": "2026-11-22T10:00:00.2Z",
    "finished_at": "2026-11-22T10:00:01.1Z",
    "timings": {"queued_s": 0.2, "inference_s": 0.8, "total_s": 1.1},
    "seeds": [42, 43],
    "images": [
        {
            "index": 0,
            "url": "/v1/generations/3f0c1d0f5d8a4c6e9a7b2e1f0a9b8c7d/images/0",
            "seed": 42,
            "width": 32,
            "height": 32,
            "sha256": "9b1d...",
        }
    ],
}


class GenerationOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [GENERATION_OUT_EXAMPLE]})

    id: str
    status: JobStatus
    progress: float = Field(description="0 queued, 0.1 running, 1 finished")
    params: dict
    model: dict[str, str]
    attempts: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    timings: Timings
    seeds: list[int]
    images: list[ImageOut]


class GenerationPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"items": [GENERATION_OUT_EXAMPLE], "next_cursor": "MjAyNi0xMS0yMlQxMDowMDowMCswMDowMHwzZjBj"}
            ]
        }
    )

    items: list[GenerationOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next (older) page; null at the end")


class TokenRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"username": "alice", "password": "correct horse"}]}
    )
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class TokenResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"access_token": "eyJhbGciOiJIUzI1NiIs...", "token_type": "bearer", "expires_in": 3600}
            ]
        }
    )

    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int


class UserCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"name": "alice", "role": "member", "password": "correct horse battery"}]
        },
    )
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    role: Literal["admin", "member"] = "member"
    password: str | None = Field(default=None, min_length=8, max_length=1024)


class UserOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "8d6f0e1c2b3a49588776655443322110",
                    "name": "alice",
                    "role": "member",
                    "created_at": "2026-11-22T10:00:00Z",
                    "disabled": False,
                }
            ]
        }
    )

    id: str
    name: str
    role: str
    created_at: datetime
    disabled: bool


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "ci"}]})
    name: str = Field(default="", max_length=64)


KEY_EXAMPLE = {
    "id": "k3y1d0000abc",
    "user_id": "8d6f0e1c2b3a49588776655443322110",
    "name": "ci",
    "created_at": "2026-11-22T10:00:00Z",
    "last_used_at": None,
    "revoked": False,
}


class KeyOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [KEY_EXAMPLE]})

    id: str
    user_id: str
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked: bool


class KeyCreated(KeyOut):
    model_config = ConfigDict(
        json_schema_extra={"examples": [KEY_EXAMPLE | {"key": "sfm_k3y1d0000abc_2Jx...(43 characters)"}]}
    )

    key: str = Field(description="the API key; shown only in this response")
