"""Request and response bodies of ``/v1/datasets`` and ``/v1/trainings`` (Pydantic v2).

The bounds are the design notes' where they apply (``model_name`` 1-100 characters, ``epochs``
1-1000 default 100, ``learning_rate`` 1e-6..1e-2 default 1e-4, ``batch_size`` 1-16 default 1).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from sfumato.control_plane.schemas import JobStatus, WebhookFields

ModelName = Annotated[
    str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
]
Prompt = Annotated[str, StringConstraints(min_length=1, max_length=500)]
MAX_VALIDATION_PROMPTS = 8


DATASET_EXAMPLE = {
    "id": "9b1c...",
    "name": "pink.zip",
    "num_images": 1200,
    "size_bytes": 1843200,
    "sha256": "ab12...",
    "created_at": "2026-11-23T01:00:00Z",
}


class DatasetOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [DATASET_EXAMPLE]})

    id: str
    name: str
    num_images: int
    size_bytes: int = Field(description="the uploaded zip's size")
    sha256: str = Field(description="SHA-256 of the uploaded zip")
    created_at: datetime


class DatasetPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"items": [DATASET_EXAMPLE], "next_cursor": None}]}
    )

    items: list[DatasetOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")


TRAINING_EXAMPLE = {
    "dataset_id": "9b1c...",
    "method": "lora",
    "steps": 1500,
    "learning_rate": 1e-3,
    "batch_size": 16,
    "rank": 8,
    "validation_prompts": ["a pink circle on a white background"],
}


class TrainingCreate(WebhookFields):  # type: ignore[misc,valid-type]
    """A fine-tune of a registered model on one of your data sets; ``webhook`` and
    ``webhook_events_filter`` as on a generation (events ``training.start``, ``training.progress``,
    ``training.completed``)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [TRAINING_EXAMPLE]})

    dataset_id: str = Field(
        min_length=1, max_length=64, description="a data set of yours (POST /v1/datasets)"
    )
    base_model: ModelName | None = Field(
        default=None, description="a registered model; default: the served one"
    )
    method: Literal["lora", "full"] = Field(
        default="lora", description="`lora`: low-rank adapters, fused at the end; `full`: the UNet's weights"
    )
    steps: int | None = Field(
        default=None, ge=1, le=100_000, description="optimizer steps (or give `epochs`)"
    )
    epochs: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="passes over the data set (default 100 when `steps` is not given)",
    )
    learning_rate: float = Field(default=1e-4, ge=1e-6, le=1e-2)
    batch_size: int = Field(default=1, ge=1, le=16)
    rank: int | None = Field(default=None, ge=1, le=128, description="LoRA rank (lora only; default 4)")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    resolution: int | None = Field(
        default=None, ge=8, le=1024, multiple_of=8, description="training images' side; default the model's"
    )
    validation_prompts: list[Prompt] = Field(default_factory=list, max_length=MAX_VALIDATION_PROMPTS)
    output_model: ModelName | None = Field(
        default=None, description="the model to add the new version to; default `base_model`"
    )
    deploy: bool = Field(default=False, description="make the new version the default for new generations")

    @model_validator(mode="after")
    def _one_length(self) -> TrainingCreate:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        if self.method == "full" and self.rank is not None:
            raise ValueError("rank applies to method lora only")
        return self


TRAINING_ID_EXAMPLE = "7a2e9c4b1d3f40a8b6c5d4e3f2a1b0c9"

TRAINING_OUT_EXAMPLE = {
    "id": TRAINING_ID_EXAMPLE,
    "status": "succeeded",
    "progress": {"step": 1500, "total": 1500, "loss": 0.0412, "eta_s": None},
    "params": TRAINING_EXAMPLE
    | {
        "base_model": "sfumato-shapes",
        "base_version": 1,
        "output_model": "sfumato-shapes",
        "epochs": None,
        "seed": 0,
        "resolution": None,
        "deploy": False,
        "dataset_sha256": "ab12...",
        "num_images": 1200,
        "estimated_duration_s": 560.0,
    },
    "dataset_id": TRAINING_EXAMPLE["dataset_id"],
    "base_model": "sfumato-shapes",
    "method": "lora",
    "estimated_duration_s": 560.0,
    "validation_images": [
        {
            "index": 0,
            "prompt": "a pink circle on a white background",
            "url": f"/v1/trainings/{TRAINING_ID_EXAMPLE}/validation/0",
        }
    ],
    "output": {"model": "sfumato-shapes", "version": "2"},
    "weights_url": f"/v1/trainings/{TRAINING_ID_EXAMPLE}/weights",
    "attempts": 1,
    "error": None,
    "created_at": "2026-11-23T01:05:00Z",
    "started_at": "2026-11-23T01:05:01Z",
    "finished_at": "2026-11-23T01:09:00Z",
}


class TrainingProgress(BaseModel):
    step: int
    total: int
    loss: float | None = None
    eta_s: float | None = None


class ValidationImage(BaseModel):
    index: int
    prompt: str
    url: str


class TrainingOutput(BaseModel):
    model: str
    version: str | None = None


class TrainingOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [TRAINING_OUT_EXAMPLE]})

    id: str
    status: JobStatus
    progress: TrainingProgress
    params: dict[str, Any]
    dataset_id: str
    base_model: str
    method: str
    estimated_duration_s: float
    validation_images: list[ValidationImage]
    output: TrainingOutput | None
    weights_url: str | None = Field(
        description="the LoRA file (diffusers format), once the training succeeded"
    )
    attempts: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None


class TrainingPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"items": [TRAINING_OUT_EXAMPLE], "next_cursor": "MjAyNi0xMS0yM1QwMTowNTowMCswMDowMHw3YTJl"}
            ]
        }
    )

    items: list[TrainingOut]
    next_cursor: str | None
