"""Request and response bodies of the REST API (Pydantic v2), with OpenAPI examples."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
)

from sfumato.serving import contract

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
SchedulerName = Literal[contract.BY_NAME["scheduler"].choices]  # type: ignore[valid-type]

GENERATION_EXAMPLE = contract.EXAMPLE


# --------------------------------------------------------------------------- GenerationCreate
# Derived from the generation contract (sfumato.serving.contract), the one declaration of the
# fields: the same names, bounds (resolved against contract.ENVELOPE, the most any served model
# may accept), descriptions and examples. Each field runs the contract's own check after
# pydantic's, so the schema accepts exactly what the pipeline accepts; the served model's own
# limits (size range, ...) are checked at submission with contract.model_limits / check_request.


def _contract_check(field: contract.Field):  # -> the AfterValidator function
    def check(value: Any) -> Any:
        try:
            return contract.check_field(field, value, contract.ENVELOPE)
        except contract.InvalidRequest as exc:
            raise ValueError(exc.message) from None

    return check


def _normalize(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _rest_field(field: contract.Field) -> tuple[Any, Any]:
    """``(annotation, FieldInfo)`` of one contract field in the REST body."""
    low, high = field.bounds(contract.ENVELOPE)
    constraints: dict[str, Any] = {}
    validators: list[Any] = []
    if field.is_array:
        annotation: Any = str  # base64 PNG/JPEG, decoded at submission
    elif field.python_type is str:
        annotation = Literal[field.choices] if field.choices else str  # type: ignore[valid-type]
        if field.normalize:
            validators.append(BeforeValidator(_normalize))
        constraints["max_length"] = field.bound(field.max_length, contract.ENVELOPE)
        if field.required:
            constraints["min_length"] = 1
    else:
        annotation = field.python_type
        constraints["gt" if field.exclusive_minimum else "ge"] = low
        constraints["le"] = high
        constraints["multiple_of"] = field.bound(field.multiple_of, contract.ENVELOPE)
        if field.python_type is float:
            constraints["allow_inf_nan"] = False
    if not field.is_array:
        validators.append(AfterValidator(_contract_check(field)))
    numeric_default = field.default if isinstance(field.default, int | float) else None
    if field.required:
        default: Any = ...
    else:
        default = numeric_default
        if default is None:
            annotation = annotation | None
    description = f"{field.description}: {field.rest_form}" if field.rest_form else field.description
    info = Field(
        default=default,
        description=description,
        examples=None if field.example is None else [field.example],
        **{k: v for k, v in constraints.items() if v is not None},
    )
    return (Annotated[annotation, *validators] if validators else annotation), info


class _GenerationBody(BaseModel):
    """A text-to-image (or img2img / inpainting) request. Unset fields take the model's defaults."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [GENERATION_EXAMPLE]})

    @field_validator("mask", "strength", check_fields=False)
    @classmethod
    def _goes_with(cls, value: Any, info: ValidationInfo) -> Any:
        """The contract's rules on which fields go together (strength and mask need an image)."""
        if value is None:
            return value
        present = {name for name, given in info.data.items() if given is not None} | {info.field_name}
        try:
            contract.check_presence(present)
        except contract.InvalidRequest as exc:
            if exc.field == info.field_name:
                raise ValueError(exc.message) from None
        return value


GenerationCreate = create_model(
    "GenerationCreate",
    __base__=_GenerationBody,
    __doc__=_GenerationBody.__doc__,
    __module__=__name__,
    **{f.name: _rest_field(f) for f in contract.GENERATION_FIELDS},
)


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
