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

from sfumato.errors import UsageError
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
    # A stream-only field is left out of the job's parameters unless given.
    numeric_default = (
        field.default if isinstance(field.default, int | float) and not field.stream_only else None
    )
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


# --------------------------------------------------------------------------- webhooks on a job
# The REST-only job options of the contract (contract.JOB_OPTIONS): a generation (and a training)
# may carry a webhook. The URL's syntax is checked here; what the operator allows (http hosts,
# addresses) at submission, by sfumato.control_plane.webhooks.check_target.


def _webhook_url(value: str | None) -> str | None:
    from sfumato.control_plane.webhooks import check_url_syntax

    if value is None:
        return None
    try:
        return check_url_syntax(value)
    except UsageError as exc:
        raise ValueError(str(exc).removeprefix("webhook: ")) from None


def _unique_events(value: list[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [event for event in contract.WEBHOOK_EVENTS if event in value]  # set semantics, fixed order


WebhookEvent = Literal[contract.WEBHOOK_EVENTS]  # type: ignore[valid-type]


def _job_option_fields() -> dict[str, tuple[Any, Any]]:
    """``name -> (annotation, FieldInfo)`` of the contract's job options (``create_model``)."""
    options = {option.name: option for option in contract.JOB_OPTIONS}
    return {
        "webhook": (
            Annotated[str | None, AfterValidator(_webhook_url)],
            Field(
                default=None,
                max_length=contract.WEBHOOK_URL_MAX_LENGTH,
                description=options["webhook"].description,
                examples=[options["webhook"].example],
            ),
        ),
        "webhook_events_filter": (
            Annotated[list[WebhookEvent] | None, AfterValidator(_unique_events)],
            Field(
                default=None,
                min_length=1,
                max_length=len(contract.WEBHOOK_EVENTS),
                description=options["webhook_events_filter"].description,
                examples=[options["webhook_events_filter"].example],
            ),
        ),
    }


class _JobOptionRules(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("webhook_events_filter", check_fields=False)
    @classmethod
    def _needs_webhook(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("webhook") is None:
            raise ValueError("only applies with a webhook")
        return value


#: ``webhook`` and ``webhook_events_filter``: every job request carries them (a training body
#: derives from it, or adds ``_job_option_fields()`` to its own ``create_model``).
WebhookFields = create_model(
    "WebhookFields", __base__=_JobOptionRules, __module__=__name__, **_job_option_fields()
)


class _GenerationBody(_JobOptionRules):
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
    **{f.name: _rest_field(f) for f in (*contract.REST_FIELDS, *contract.ROUTING_FIELDS)},
    **_job_option_fields(),  # after the pipeline's fields: the control plane's own
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
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None


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


# --------------------------------------------------------------------------- model registry

MODEL_OUT_EXAMPLE = {
    "name": "sfumato-shapes",
    "default": True,
    "deployed_version": 2,
    "triton_model": "pipeline",
    "limits": {"min_size": 16, "max_size": 64, "size_multiple": 8, "max_steps": 150, "max_images": 8},
    "defaults": {"width": 32, "height": 32, "steps": 25, "guidance_scale": 5.0, "scheduler": "ddim"},
    "versions": [
        {
            "version": 2,
            "status": "ready",
            "deployed": True,
            "deployed_at": "2026-11-23T01:00:00Z",
            "created_at": "2026-11-23T00:59:00Z",
            "ready_at": "2026-11-23T00:59:30Z",
            "lineage": {"base_model": "sfumato-shapes", "base_version": 1, "training_id": "9c1e..."},
            "files": {"unet/2/model.onnx": "3a8f..."},
            "validation": [{"prompt": "a pink circle on a white background", "sha256": "77c2..."}],
            "error": None,
        }
    ],
}


class ModelVersionOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [MODEL_OUT_EXAMPLE["versions"][0]]})

    version: int
    status: Literal["loading", "ready", "failed"]
    deployed: bool = Field(description="the version a generation naming this model but no version gets")
    deployed_at: datetime | None = Field(description="when it was last deployed")
    created_at: datetime
    ready_at: datetime | None
    lineage: dict[str, Any] = Field(
        description="what it came from: base model and version, data set, training, parameters, metrics"
    )
    files: dict[str, str] = Field(description="its files in the model repository and their sha256")
    validation: list[dict[str, Any]] = Field(description="the validation prompts run through Triton")
    error: str | None


class ModelOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [MODEL_OUT_EXAMPLE]})

    name: str
    default: bool = Field(description="the model a generation naming no model gets")
    deployed_version: int | None
    triton_model: str = Field(
        description="its Triton pipeline model (gRPC: model_name; version: model_version)"
    )
    limits: dict[str, Any] | None = Field(description="what it accepts (from Triton; null when unreachable)")
    defaults: dict[str, Any] | None = Field(description="what a request leaving a field out gets")
    versions: list[ModelVersionOut]


# --------------------------------------------------------------------------- webhooks

WebhookDeliveryStatus = Literal["pending", "delivered", "failed", "skipped"]


class WebhookSecretOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                    "previous_secret_expires_at": "2026-11-23T10:00:00Z",
                    "created_at": "2026-11-22T10:00:00Z",
                    "rotated_at": "2026-11-22T10:00:00Z",
                }
            ]
        }
    )

    secret: str = Field(description="verify `webhook-signature` with it (Standard Webhooks `whsec_`)")
    previous_secret_expires_at: datetime | None = Field(
        description="after a rotation: until then deliveries carry the previous secret's signature too"
    )
    created_at: datetime
    rotated_at: datetime | None


class WebhookAttemptOut(BaseModel):
    number: int
    started_at: datetime
    duration_ms: float | None
    outcome: str | None = Field(
        description="delivered, gone (410), http_error, redirect (not followed), timeout, "
        "connection_error, refused (SSRF guard), interrupted; null: in progress, or its dispatcher "
        "stopped before recording it (the delivery is sent again with the same webhook-id)"
    )
    status_code: int | None
    error: str | None
    response_excerpt: str | None = Field(description="the first 512 characters of the answer")


WEBHOOK_DELIVERY_EXAMPLE = {
    "id": "msg_3f0c1d0f5d8a4c6e9a7b2e1f0a9b8c7d",
    "job_id": "3f0c1d0f5d8a4c6e9a7b2e1f0a9b8c7d",
    "event_type": "generation.completed",
    "url": "https://example.com/hooks/sfumato",
    "endpoint_id": "8d6f0e1c2b3a49588776655443322110",
    "status": "delivered",
    "attempts": 2,
    "next_attempt_at": None,
    "last_error": None,
    "created_at": "2026-11-22T10:00:01Z",
    "finished_at": "2026-11-22T10:00:07Z",
    "attempt_log": [
        {
            "number": 1,
            "started_at": "2026-11-22T10:00:01Z",
            "duration_ms": 12.5,
            "outcome": "http_error",
            "status_code": 503,
            "error": None,
            "response_excerpt": "busy",
        },
        {
            "number": 2,
            "started_at": "2026-11-22T10:00:07Z",
            "duration_ms": 9.1,
            "outcome": "delivered",
            "status_code": 204,
            "error": None,
            "response_excerpt": None,
        },
    ],
}


class WebhookDeliveryOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [WEBHOOK_DELIVERY_EXAMPLE]})

    id: str = Field(description="the `webhook-id` header: the same on every attempt")
    job_id: str
    event_type: str
    url: str
    endpoint_id: str
    status: WebhookDeliveryStatus
    attempts: int
    next_attempt_at: datetime | None = Field(description="pending: when the next attempt is due")
    last_error: str | None
    created_at: datetime
    finished_at: datetime | None
    attempt_log: list[WebhookAttemptOut]


class WebhookDeliveryPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [WEBHOOK_DELIVERY_EXAMPLE],
                    "next_cursor": "MjAyNi0xMS0yMlQxMDowMDowMSswMDowMHxtc2dfM2YwYw",
                }
            ]
        }
    )

    items: list[WebhookDeliveryOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next (older) page; null at the end")


class WebhookEndpointOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "8d6f0e1c2b3a49588776655443322110",
                    "url": "https://example.com/hooks/sfumato",
                    "disabled": True,
                    "disabled_at": "2026-11-22T12:00:00Z",
                    "disabled_reason": "20 failed attempts in a row (last: http_error: HTTP 503)",
                    "consecutive_failures": 20,
                    "last_success_at": "2026-11-22T10:00:07Z",
                    "created_at": "2026-11-22T10:00:01Z",
                }
            ]
        }
    )

    id: str
    url: str
    disabled: bool
    disabled_at: datetime | None
    disabled_reason: str | None
    consecutive_failures: int
    last_success_at: datetime | None
    created_at: datetime
