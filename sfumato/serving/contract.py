"""The generation contract, declared once: every field of a generation request, its wire type,
bounds, default and meaning; the served model's limits and defaults; the models' outputs.

Everything else is derived from this module: the ``pipeline`` and ``pipeline_stream`` configs
(``sfumato.export.repository``), the pipeline's validation (:func:`check_request`, used by
``sfumato.serving.request``), the gRPC client's input tensors (``sfumato.clients.triton_grpc``)
and the REST ``GenerationCreate`` (``sfumato.control_plane.schemas``). It runs inside Triton's
python backend, so it is plain dataclasses and numpy (no pydantic).

Bounds are either numbers or the name of a :class:`Limits` attribute. The REST schema resolves
them against :data:`ENVELOPE` (the most any served model may accept); a served model's own
:class:`Limits` and :class:`Defaults` are published in its ``config.pbtxt`` ``parameters``
(:func:`config_parameters`), read back by :func:`model_limits` from Triton's model config, and
enforced by :func:`check_request`, which raises :class:`InvalidRequest` naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

import numpy as np

from sfumato.errors import UsageError
from sfumato.serving.schedulers import SCHEDULERS

MODEL = "pipeline"
STREAM_MODEL = "pipeline_stream"
MAX_SEED = 2**63 - 1


class InvalidRequest(UsageError, ValueError):
    """A request field is missing or out of range; ``field`` names it.

    A :class:`~sfumato.errors.UsageError`, so the control plane answers it as a 422 problem
    naming the field; inside Triton it becomes an ``INVALID_ARGUMENT`` error response.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", field=field)
        self.message = message


@dataclass(frozen=True, slots=True)
class Limits:
    """What one served model accepts (``sfumato export`` publishes it in the pipeline config)."""

    min_size: int
    max_size: int
    size_multiple: int = 8
    max_steps: int = 150
    max_images: int = 8
    max_guidance: float = 50.0
    max_prompt_chars: int = 2000


@dataclass(frozen=True, slots=True)
class Defaults:
    """What a request that leaves a field out gets from the served model."""

    width: int
    height: int
    steps: int = 25
    guidance_scale: float = 7.5
    scheduler: str = "ddim"
    img2img_strength: float = 0.8
    inpaint_strength: float = 1.0


#: The most any served model may accept: the REST schema's static bounds. A model's limits lie
#: within it (``sfumato export`` checks), so the schema never rejects what a model accepts.
ENVELOPE = Limits(min_size=8, max_size=4096)

WIRE_INT_RANGE = {"INT32": (-(2**31), 2**31 - 1), "INT64": (-(2**63), 2**63 - 1)}

Bound = int | float | str | None  # a number, or the name of a Limits attribute


@dataclass(frozen=True, slots=True)
class Field:
    """One input tensor of the pipeline models, and the REST field of the same name."""

    name: str
    datatype: str  # Triton wire type: BYTES, INT32, INT64, FP32, UINT8
    shape: tuple[int, ...]  # per request, no batch axis (the models have max_batch_size 0)
    python_type: type  # what the pipeline reads it as: str, int, float, np.ndarray
    description: str
    example: Any = None
    required: bool = False
    minimum: Bound = None
    maximum: Bound = None
    exclusive_minimum: bool = False
    multiple_of: Bound = None
    max_length: Bound = None
    not_blank: bool = False
    choices: tuple[str, ...] = ()
    normalize: bool = False  # strings: compared stripped and lower-cased
    default: int | float | str | None = None  # a constant default
    model_default: str | None = None  # else: this attribute of the served model's Defaults
    default_text: str = ""  # where the default comes from, for people
    rest_form: str = ""  # arrays: how REST carries them (base64 image), appended to the description
    stream_only: bool = False  # an input of ``pipeline_stream`` only (not of ``pipeline``)
    rest: bool = True  # a field of the REST request (a stream-only one: left out unless given)

    @property
    def is_array(self) -> bool:
        return self.python_type is np.ndarray

    def bound(self, value: Bound, limits: Limits) -> int | float | None:
        return getattr(limits, value) if isinstance(value, str) else value

    def bounds(self, limits: Limits) -> tuple[int | float | None, int | float | None]:
        return self.bound(self.minimum, limits), self.bound(self.maximum, limits)

    @property
    def config_type(self) -> str:
        """``config.pbtxt``'s name for the wire type (``BYTES`` is ``TYPE_STRING`` there)."""
        return config_type(self.datatype)


_SIZE_DOC = "a multiple of 8 within the model's size range"

FIELDS: tuple[Field, ...] = (
    Field(
        "prompt",
        "BYTES",
        (1,),
        str,
        "what to draw",
        example="a red circle on a white background",
        required=True,
        max_length="max_prompt_chars",
        not_blank=True,
    ),
    Field(
        "negative_prompt",
        "BYTES",
        (1,),
        str,
        "what to steer away from",
        example="a blue square",
        max_length="max_prompt_chars",
        default_text="empty",
    ),
    Field(
        "num_images",
        "INT32",
        (1,),
        int,
        "images for this prompt",
        example=2,
        minimum=1,
        maximum="max_images",
        default=1,
        default_text="1",
    ),
    Field(
        "steps",
        "INT32",
        (1,),
        int,
        "denoising steps",
        example=25,
        minimum=1,
        maximum="max_steps",
        model_default="steps",
        default_text="the model's (25)",
    ),
    Field(
        "guidance_scale",
        "FP32",
        (1,),
        float,
        "classifier-free guidance; 1 or less turns it off (and halves the UNet rows)",
        example=5.0,
        minimum=0.0,
        maximum="max_guidance",
        model_default="guidance_scale",
        default_text="the model's (7.5; the demo model 5)",
    ),
    Field(
        "seed",
        "INT64",
        (1,),
        int,
        "image i uses seed + i (mod 2^63), so any image regenerates alone from its seed",
        example=42,
        minimum=0,
        maximum=MAX_SEED,
        default_text="random, reported in the output",
    ),
    Field(
        "width",
        "INT32",
        (1,),
        int,
        f"image width in pixels, {_SIZE_DOC}",
        example=32,
        minimum="min_size",
        maximum="max_size",
        multiple_of="size_multiple",
        model_default="width",
        default_text="the source image's, else the model's native width",
    ),
    Field(
        "height",
        "INT32",
        (1,),
        int,
        f"image height in pixels, {_SIZE_DOC}",
        example=32,
        minimum="min_size",
        maximum="max_size",
        multiple_of="size_multiple",
        model_default="height",
        default_text="the source image's, else the model's native height",
    ),
    Field(
        "scheduler",
        "BYTES",
        (1,),
        str,
        "the sampler: " + ", ".join(SCHEDULERS),
        example="ddim",
        choices=tuple(SCHEDULERS),
        normalize=True,
        model_default="scheduler",
        default_text="the model's (its source's scheduler)",
    ),
    Field(
        "image",
        "UINT8",
        (-1, -1, 3),
        np.ndarray,
        "img2img / inpainting source",
        rest_form="base64 PNG or JPEG",
    ),
    Field(
        "mask",
        "UINT8",
        (-1, -1),
        np.ndarray,
        "inpainting mask",
        rest_form="base64 PNG, white = repaint",
    ),
    Field(
        "strength",
        "FP32",
        (1,),
        float,
        "how much of the source image to repaint; only with an image",
        example=0.6,
        minimum=0.0,
        exclusive_minimum=True,
        maximum=1.0,
        default_text="the model's (0.8, inpainting 1.0)",
    ),
    Field(
        "preview_every",
        "INT32",
        (1,),
        int,
        "pipeline_stream only (REST: the job's progress events): send a preview of the images "
        "every k steps (0: none)",
        example=5,
        minimum=0,
        maximum="max_steps",
        default=0,
        default_text="0 (no previews)",
        stream_only=True,
    ),
)
#: Which registered model serves a generation (``sfumato.control_plane.registry``): fields of
#: the REST request and of the job, not inputs of the pipeline models (a pipeline *is* one
#: version of one model; Triton's ``model_name`` / ``model_version`` choose it).
ROUTING_FIELDS: tuple[Field, ...] = (
    Field(
        "model",
        "BYTES",
        (1,),
        str,
        "the registered model to run (GET /v1/models lists them)",
        example="sfumato-shapes",
        max_length=64,
        not_blank=True,
        default_text="the default model (the last one deployed)",
    ),
    Field(
        "model_version",
        "INT32",
        (1,),
        int,
        "the model's version; needs model",
        example=1,
        minimum=1,
        maximum=2**31 - 1,
        default_text="the model's deployed version",
    ),
)
BY_NAME: dict[str, Field] = {f.name: f for f in (*FIELDS, *ROUTING_FIELDS)}
#: The generation fields (REST, ``pipeline``, and the job's parameters).
GENERATION_FIELDS: tuple[Field, ...] = tuple(f for f in FIELDS if not f.stream_only)
#: The fields of a REST generation request: the generation fields, and ``preview_every`` (the
#: control plane's worker streams from ``pipeline_stream`` and publishes the previews as progress
#: events).
REST_FIELDS: tuple[Field, ...] = tuple(f for f in FIELDS if f.rest)


@dataclass(frozen=True, slots=True)
class Output:
    name: str
    datatype: str
    shape: tuple[int, ...]
    description: str

    @property
    def config_type(self) -> str:
        return config_type(self.datatype)


OUTPUTS: tuple[Output, ...] = (
    Output("images", "UINT8", (-1, -1, -1, 3), "the images, [N, H, W, 3]"),
    Output("seeds", "INT64", (-1,), "each image's own seed, [N]"),
)
#: ``pipeline_stream`` answers each step with ``step`` and ``total`` (and ``preview`` every k
#: steps when asked), then the final ``images`` and ``seeds``.
STREAM_OUTPUTS: tuple[Output, ...] = (
    Output("step", "INT32", (1,), "denoising steps done (1..total)"),
    Output("total", "INT32", (1,), "denoising steps this request runs"),
    Output("preview", "UINT8", (-1, -1, -1, 3), "the images as they stand, [N, H, W, 3]"),
    *OUTPUTS,
)

#: The example request of the API documentation (checked against the contract by a test).
EXAMPLE: dict[str, Any] = {
    "prompt": "a red circle on a white background",
    "num_images": 2,
    "steps": 25,
    "guidance_scale": 5.0,
    "seed": 42,
}

# Older names, kept so that callers of the first contract keep working.
SCALAR_INPUTS: dict[str, str] = {f.name: f.datatype for f in GENERATION_FIELDS if not f.is_array}
ARRAY_INPUTS: dict[str, tuple[str, tuple[int, ...]]] = {
    f.name: (f.datatype, f.shape) for f in GENERATION_FIELDS if f.is_array
}
OPTIONS: tuple[str, ...] = tuple(name for name in SCALAR_INPUTS if name != "prompt")


def input_fields(*, stream: bool) -> tuple[Field, ...]:
    """The input tensors of ``pipeline`` (``stream=False``) or ``pipeline_stream``."""
    return FIELDS if stream else GENERATION_FIELDS


def python_type(datatype: str) -> type:
    """The Python type a scalar of ``datatype`` is read as."""
    if datatype == "BYTES":
        return str
    return float if datatype.startswith("FP") else int


def config_type(datatype: str) -> str:
    """``config.pbtxt``'s name for a wire datatype (``BYTES`` is ``TYPE_STRING`` there)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


# --------------------------------------------------------------------------- one field


def _range_text(field: Field, low: Any, high: Any) -> str:
    low, high = (f"{v:g}" if isinstance(v, float) else v for v in (low, high))
    return f"({low}, {high}]" if field.exclusive_minimum else f"{low}..{high}"


def _check_number(field: Field, value: Any, limits: Limits) -> int | float:
    if isinstance(value, bool | str | bytes) or value is None:
        raise InvalidRequest(field.name, f"must be a number, got {value!r}")
    if field.python_type is int:
        if isinstance(value, float | np.floating) and not (
            math.isfinite(value) and float(value).is_integer()
        ):
            raise InvalidRequest(field.name, f"{value} is not a whole number")
        number: int | float = int(value)
    else:
        try:
            number = float(value)
        except OverflowError:
            raise InvalidRequest(field.name, f"{value} is not a finite number") from None
        if not math.isfinite(number):
            raise InvalidRequest(field.name, f"{value} is not a finite number")
    multiple = field.bound(field.multiple_of, limits)
    if multiple and number % multiple:
        raise InvalidRequest(field.name, f"{value} is not a multiple of {multiple}")
    low, high = field.bounds(limits)
    # FP32 fields are checked as given and as the float32 the wire carries, so that a value
    # accepted here is still accepted after the client rounds it (1e-50 is 0 in float32).
    candidates = [number]
    if field.datatype == "FP32":
        with np.errstate(over="ignore"):
            candidates.append(float(np.float32(number)))
    for candidate in candidates:
        too_low = low is not None and (candidate <= low if field.exclusive_minimum else candidate < low)
        if too_low or (high is not None and candidate > high) or not math.isfinite(candidate):
            raise InvalidRequest(field.name, f"{value} is outside {_range_text(field, low, high)}")
    return number


def _check_text(field: Field, value: Any, limits: Limits) -> str:
    if isinstance(value, bytes | np.bytes_):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(field.name, "is not valid UTF-8") from None
    if not isinstance(value, str):
        raise InvalidRequest(field.name, f"must be a string, got {type(value).__name__}")
    if field.not_blank and not value.strip():
        raise InvalidRequest(field.name, "must not be empty")
    longest = field.bound(field.max_length, limits)
    if longest is not None and len(value) > longest:
        raise InvalidRequest(field.name, f"longer than {longest} characters")
    if field.normalize:
        value = value.strip().lower()
    if field.choices and value not in field.choices:
        raise InvalidRequest(
            field.name, f"unknown {field.name} {value!r}; choose one of {', '.join(field.choices)}"
        )
    return value


def _check_array(field: Field, value: Any) -> np.ndarray:
    array = np.asarray(value)
    if field.name == "mask" and array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    wanted = (
        "[" + ", ".join("H" if i == 0 else "W" if i == 1 else str(d) for i, d in enumerate(field.shape)) + "]"
    )
    fits = array.ndim == len(field.shape) and all(
        d in (-1, n) for d, n in zip(field.shape, array.shape, strict=True)
    )
    if array.dtype != np.uint8 or not fits:
        raise InvalidRequest(field.name, f"must be uint8 {wanted}, got {array.dtype} {list(array.shape)}")
    return array


def check_field(field: Field, value: Any, limits: Limits) -> Any:
    """``value`` as the pipeline reads it (strings decoded and normalised, numbers typed), or
    :class:`InvalidRequest` naming the field. ``None`` (absent) passes through."""
    if value is None:
        return None
    if field.is_array:
        return _check_array(field, value)
    if field.python_type is str:
        return _check_text(field, value, limits)
    return _check_number(field, value, limits)


# --------------------------------------------------------------------------- a whole request


def check_presence(names: set[str] | frozenset[str]) -> None:
    """The rules on which fields go together (known without the model or the pixels)."""
    if "mask" in names and "image" not in names:
        raise InvalidRequest("mask", "needs an image to inpaint")
    if "strength" in names and "image" not in names:
        raise InvalidRequest("strength", "only applies with an image (img2img or inpainting)")


def _size_from_image(name: str, given: Any, actual: int) -> int:
    if given is not None and given != actual:
        raise InvalidRequest(name, f"{given} does not match the image {name} {actual}")
    return actual


def check_request(
    request: Mapping[str, Any], *, limits: Limits, defaults: Defaults, stream: bool = False
) -> dict[str, Any]:
    """Check a request against a served model's limits and fill in its defaults.

    ``request`` maps field names to values (absent or ``None``: the default); ``image`` and
    ``mask`` are arrays (``uint8 [H, W, 3]`` and ``[H, W]``). Returns every generation field
    (``seed`` stays ``None`` when absent: random). Raises :class:`InvalidRequest` naming the
    first bad field. The pipeline models call it on every request; the control plane can call
    it at submission with the limits :func:`model_limits` read from Triton.
    """
    known = input_fields(stream=stream)
    unknown = sorted(set(request) - {f.name for f in known})
    if unknown:
        raise InvalidRequest(unknown[0], "is not a field of this model")
    values = {f.name: check_field(f, request.get(f.name), limits) for f in known}
    if values["prompt"] is None:
        raise InvalidRequest("prompt", "is required")
    check_presence({name for name, value in values.items() if value is not None})
    for f in known:
        if values[f.name] is None and f.default is not None:
            values[f.name] = f.default
    if values["negative_prompt"] is None:
        values["negative_prompt"] = ""

    image, mask = values["image"], values["mask"]
    if image is not None:
        values["height"] = _size_from_image("height", values["height"], image.shape[0])
        values["width"] = _size_from_image("width", values["width"], image.shape[1])
        for name in ("height", "width"):
            try:
                check_field(BY_NAME[name], values[name], limits)
            except InvalidRequest as exc:
                raise InvalidRequest("image", f"{image.shape[1]}x{image.shape[0]}: {exc}") from None
    if mask is not None and mask.shape != image.shape[:2]:
        raise InvalidRequest(
            "mask", f"shape {list(mask.shape)} does not match the image's {list(image.shape[:2])}"
        )
    for f in known:
        if values[f.name] is None and f.model_default is not None:
            values[f.name] = getattr(defaults, f.model_default)
    if image is None:
        values["strength"] = 1.0
    elif values["strength"] is None:
        values["strength"] = defaults.inpaint_strength if mask is not None else defaults.img2img_strength
    if image is not None and int(values["steps"] * values["strength"]) < 1:
        raise InvalidRequest(
            "strength", f"{values['strength']} with {values['steps']} steps leaves no denoising step"
        )
    return values


# --------------------------------------------------------------------------- the served model's limits

_LIMIT_PREFIX, _DEFAULT_PREFIX = "limit_", "default_"
_TYPES = {"int": int, "float": float, "str": str}


def config_parameters(limits: Limits, defaults: Defaults) -> dict[str, str]:
    """The ``config.pbtxt`` ``parameters`` that publish a model's limits and defaults."""
    out = {f"{_LIMIT_PREFIX}{f.name}": str(getattr(limits, f.name)) for f in fields(Limits)}
    out |= {f"{_DEFAULT_PREFIX}{f.name}": str(getattr(defaults, f.name)) for f in fields(Defaults)}
    return out


@dataclass(frozen=True, slots=True)
class ModelContract:
    """A served model's limits and defaults, as its config publishes them."""

    limits: Limits
    defaults: Defaults

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """``{"limits": {...}, "defaults": {...}}``, e.g. for ``GET /v1/models``."""
        return {
            "limits": {f.name: getattr(self.limits, f.name) for f in fields(Limits)},
            "defaults": {f.name: getattr(self.defaults, f.name) for f in fields(Defaults)},
        }

    def check(self, request: Mapping[str, Any], *, stream: bool = False) -> dict[str, Any]:
        """:func:`check_request` against this model."""
        return check_request(request, limits=self.limits, defaults=self.defaults, stream=stream)


def _parameter_values(config: Mapping[str, Any]) -> dict[str, str]:
    config = config.get("config", config)  # tritonclient gRPC's as_json wraps it
    out = {}
    for key, value in (config.get("parameters") or {}).items():
        if isinstance(value, Mapping):
            value = value.get("string_value", value.get("stringValue"))
        if isinstance(value, str):
            out[key] = value
    return out


def model_limits(config: Mapping[str, Any]) -> ModelContract:
    """Read a model's limits and defaults back from its config, as JSON: what tritonclient
    returns (``get_model_config(name, as_json=True)``, gRPC or HTTP) or the python backend's
    ``args["model_config"]``. Raises ``ValueError`` naming the missing or bad parameter."""
    values = _parameter_values(config)

    def read(cls: type, prefix: str) -> Any:
        kwargs = {}
        for f in fields(cls):
            key = prefix + f.name
            if key not in values:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise ValueError(f"model config parameter {key!r} is missing")
                continue
            try:
                kwargs[f.name] = _TYPES[f.type](values[key])
            except ValueError:
                raise ValueError(f"model config parameter {key!r}: bad value {values[key]!r}") from None
        return cls(**kwargs)

    return ModelContract(limits=read(Limits, _LIMIT_PREFIX), defaults=read(Defaults, _DEFAULT_PREFIX))


def check_limits_within_envelope(limits: Limits) -> None:
    """A model may accept less than :data:`ENVELOPE`, never more (the REST schema is static)."""
    for f in fields(Limits):
        mine, most = getattr(limits, f.name), getattr(ENVELOPE, f.name)
        if f.name == "min_size" and mine < most:
            raise ValueError(f"min_size {mine} is below the contract's {most}")
        if f.name == "size_multiple" and mine % most:
            raise ValueError(f"size_multiple {mine} is not a multiple of the contract's {most}")
        if f.name.startswith("max_") and mine > most:
            raise ValueError(f"{f.name} {mine} is above the contract's {most}")


# --------------------------------------------------------------------------- job options (REST only)
# Fields of a job request (a generation, a training) that belong to the control plane, not to the
# pipeline: never Triton inputs, never in a job's ``params``. The REST schema derives its fields
# from these (``sfumato.control_plane.schemas.WebhookFields``); the control plane delivers them
# (``sfumato.control_plane.webhooks``).

#: The job events a webhook can ask for (``webhook_events_filter``), as Replicate and cog name them:
#: ``start`` (the job began running), ``progress`` (denoising / training steps), ``completed`` (a
#: final status: succeeded, failed or canceled).
WEBHOOK_EVENTS: tuple[str, ...] = ("start", "progress", "completed")
WEBHOOK_URL_MAX_LENGTH = 2048


@dataclass(frozen=True, slots=True)
class JobOption:
    """One REST-only field of a job request."""

    name: str
    description: str
    example: Any = None


JOB_OPTIONS: tuple[JobOption, ...] = (
    JobOption(
        "webhook",
        "a URL that receives this job's events as signed POSTs (Standard Webhooks: `webhook-id`, "
        "`webhook-timestamp`, `webhook-signature`); https, or http for hosts the operator lists",
        example="https://example.com/hooks/sfumato",
    ),
    JobOption(
        "webhook_events_filter",
        "which events to send to `webhook`: " + ", ".join(WEBHOOK_EVENTS) + "; default: all of them",
        example=["start", "completed"],
    ),
)
JOB_OPTIONS_BY_NAME: dict[str, JobOption] = {option.name: option for option in JOB_OPTIONS}
JOB_OPTION_NAMES: frozenset[str] = frozenset(JOB_OPTIONS_BY_NAME)
