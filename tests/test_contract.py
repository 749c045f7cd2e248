"""The generation contract (``sfumato.serving.contract``) and what is derived from it: the REST
``GenerationCreate``, the pipeline's validation, the models' configs, the gRPC client's inputs,
and the served model's limits published in and read back from its config."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf.json_format import MessageToJson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sfumato.clients.triton_grpc import InvalidArgumentError, pipeline_inputs, triton_error
from sfumato.control_plane.schemas import GenerationCreate
from sfumato.export.triton_config import parse_pbtxt
from sfumato.serving import contract
from sfumato.serving.contract import ENVELOPE, Defaults, InvalidRequest, Limits
from sfumato.serving.request import build_request

PROMPT = "a red circle on a white background"
DEMO_LIMITS = Limits(min_size=16, max_size=64)
DEMO_DEFAULTS = Defaults(width=32, height=32, guidance_scale=5.0)
SCALARS = [f for f in contract.GENERATION_FIELDS if not f.is_array]


# --------------------------------------------------------------------------- REST == pipeline


def _values(field: contract.Field) -> st.SearchStrategy:
    """JSON values of the field's type: around every bound, far outside, and anything."""
    low, high = field.bounds(ENVELOPE)
    if field.python_type is str:
        longest = field.bound(field.max_length, ENVELOPE) or 50
        near = [c.upper() for c in field.choices] + [f" {c} " for c in field.choices] + list(field.choices)
        return st.one_of(
            st.text(max_size=30),
            st.sampled_from(["", " ", "\t\n", "x", *near]),
            st.integers(longest - 2, longest + 2).map(lambda n: "a" * n),
            st.integers(longest - 2, longest + 2).map(lambda n: " " * n),
        )
    edges = [b for b in (low, high) if b is not None]
    if field.python_type is int:
        return st.one_of(
            st.integers(),
            st.sampled_from(edges).flatmap(lambda b: st.integers(int(b) - 17, int(b) + 17)),
            st.integers(-(2**70), 2**70),
        )
    return st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.floats(min_value=-1.0, max_value=high + 1.0),
        st.sampled_from(edges).flatmap(
            lambda b: st.sampled_from([b, math.nextafter(b, -1e9), math.nextafter(b, 1e9)])
        ),
        st.sampled_from([1e-50, 5e-324, 50.000001, 1e300, 3.5e38]),
        st.integers(-3, 60),
    )


def _valid(field: contract.Field) -> st.SearchStrategy:
    """Values every model accepts (edges included)."""
    low, high = field.bounds(ENVELOPE)
    if field.choices:
        return st.sampled_from(field.choices)
    if field.python_type is str:
        return st.text(max_size=30).filter(lambda v: not field.not_blank or v.strip())
    if field.python_type is int:
        step = field.bound(field.multiple_of, ENVELOPE) or 1
        return st.integers(math.ceil(low / step), high // step).map(lambda n: n * step)
    return st.floats(low, high, exclude_min=field.exclusive_minimum)


@st.composite
def _requests(draw) -> dict[str, Any]:
    """A request with some fields set, all valid but (mostly) one drawn from anything."""
    target = draw(st.sampled_from(SCALARS))
    body: dict[str, Any] = {"prompt": PROMPT}
    for field in SCALARS:
        if field is target or (field.name != "strength" and draw(st.booleans())):
            body[field.name] = draw(_values(field) if field is target else _valid(field))
    return body


def _rest_accepts(body: dict[str, Any]) -> bool:
    try:
        GenerationCreate.model_validate_json(json.dumps(body))
    except ValidationError:
        return False
    return True


def _pipeline_accepts(body: dict[str, Any]) -> bool:
    try:
        contract.check_request(body, limits=ENVELOPE, defaults=Defaults(width=64, height=64))
    except InvalidRequest:
        return False
    return True


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_requests())
@example({"prompt": PROMPT, "strength": 0.5})  # strength without an image
@example({"prompt": PROMPT, "guidance_scale": 50.000001})  # over as given, 50.0 as float32
@example({"prompt": " \t"})
@example({"prompt": PROMPT, "scheduler": " DDIM "})
def test_rest_schema_accepts_exactly_what_the_pipeline_accepts(body: dict[str, Any]) -> None:
    rest = _rest_accepts(body)
    assert rest == _pipeline_accepts(body), body
    if rest:
        # What REST accepted is still accepted after the worker sends it over the wire: FP32
        # rounding (1e-50 -> 0.0) cannot turn an accepted request into a failed job.
        wire = {
            k: float(np.float32(v)) if contract.BY_NAME[k].datatype == "FP32" else v for k, v in body.items()
        }
        assert _pipeline_accepts(wire), wire


@settings(max_examples=500, deadline=None)
@given(_values(contract.BY_NAME["strength"]), st.integers(1, 150), st.booleans())
@example(1e-50, 25, False)  # 0.0 in float32
def test_with_an_image_rest_and_the_pipeline_differ_only_on_the_submission_rule(
    strength: float, steps: int, with_mask: bool
) -> None:
    body = {"prompt": PROMPT, "image": "cG5n", "strength": strength, "steps": steps}
    rest = _rest_accepts(body | ({"mask": "cG5n"} if with_mask else {}))

    def pipeline(value: float) -> InvalidRequest | None:
        request = {
            "prompt": PROMPT,
            "image": np.zeros((32, 32, 3), np.uint8),
            "strength": value,
            "steps": steps,
        }
        if with_mask:
            request["mask"] = np.zeros((32, 32), np.uint8)
        try:
            contract.check_request(request, limits=DEMO_LIMITS, defaults=DEMO_DEFAULTS)
        except InvalidRequest as exc:
            return exc
        return None

    if pipeline(strength) is None:
        assert rest, body
    with np.errstate(over="ignore"):
        wire = float(np.float32(strength))  # what the worker sends
    wire_error = pipeline(wire)
    if rest and wire_error is not None:
        # REST may accept only what needs the request as a whole: no step left at this strength
        # (checked at submission with the served model, ModelContract.check).
        assert "leaves no denoising step" in str(wire_error), (wire_error, body)


def test_rest_schema_keeps_todays_names_bounds_descriptions_and_example() -> None:
    schema = GenerationCreate.model_json_schema()
    props = schema["properties"]
    job_options = [option.name for option in contract.JOB_OPTIONS]  # REST only (webhooks)
    assert list(props) == [f.name for f in (*contract.REST_FIELDS, *contract.ROUTING_FIELDS)] + job_options
    assert list(props) == [f.name for f in contract.GENERATION_FIELDS] + [
        "preview_every",
        "model",
        "model_version",
        *job_options,
    ]
    assert props["preview_every"].get("default") is None  # left out of the job unless asked
    assert schema["required"] == ["prompt"] and schema["additionalProperties"] is False
    assert schema["examples"] == [contract.EXAMPLE]
    assert props["prompt"]["description"] == "what to draw"
    assert props["image"]["description"] == "img2img / inpainting source: base64 PNG or JPEG"
    assert props["mask"]["description"] == "inpainting mask: base64 PNG, white = repaint"
    assert props["prompt"]["maxLength"] == 2000 and props["prompt"]["minLength"] == 1
    assert props["num_images"]["default"] == 1 and props["num_images"]["maximum"] == 8
    steps = props["steps"]["anyOf"][0]
    assert (steps["minimum"], steps["maximum"]) == (1, 150)
    width = props["width"]["anyOf"][0]
    assert (width["minimum"], width["maximum"], width["multipleOf"]) == (8, 4096, 8)
    assert props["scheduler"]["anyOf"][0]["enum"] == ["ddim", "euler", "euler_a", "dpmpp_2m"]
    assert props["strength"]["anyOf"][0]["exclusiveMinimum"] == 0.0
    assert props["seed"]["anyOf"][0]["maximum"] == 2**63 - 1
    for name, prop in props.items():
        declared = contract.BY_NAME[name] if name in contract.BY_NAME else contract.JOB_OPTIONS_BY_NAME[name]
        assert prop["description"].startswith(declared.description), name
    # The example is a request every model accepts.
    contract.check_request(contract.EXAMPLE, limits=DEMO_LIMITS, defaults=DEMO_DEFAULTS)
    GenerationCreate.model_validate(contract.EXAMPLE)


def test_rest_errors_name_the_field_with_the_contracts_message() -> None:
    for body, field, message in [
        ({"prompt": "  "}, "prompt", "must not be empty"),
        ({"prompt": PROMPT, "strength": 0.5}, "strength", "only applies with an image"),
        ({"prompt": PROMPT, "mask": "cG5n"}, "mask", "needs an image to inpaint"),
        ({"prompt": PROMPT, "image": "cG5n", "strength": 1e-50}, "strength", "is outside (0, 1]"),
    ]:
        with pytest.raises(ValidationError) as caught:
            GenerationCreate.model_validate(body)
        (error,) = caught.value.errors()
        assert error["loc"] == (field,) and message in error["msg"], error


# --------------------------------------------------------------------------- the pipeline's checks


@pytest.mark.parametrize(
    ("request_", "field", "message"),
    [
        ({}, "prompt", "is required"),
        ({"prompt": None}, "prompt", "is required"),
        ({"prompt": PROMPT, "colour": "red"}, "colour", "is not a field"),
        ({"prompt": PROMPT, "preview_every": 2}, "preview_every", "is not a field"),  # pipeline_stream only
        ({"prompt": PROMPT, "width": 72}, "width", "72 is outside 16..64"),
        ({"prompt": PROMPT, "height": 24 + 4}, "height", "not a multiple of 8"),
        ({"prompt": PROMPT, "steps": 151}, "steps", "151 is outside 1..150"),
        ({"prompt": PROMPT, "steps": 2.5}, "steps", "not a whole number"),
        ({"prompt": PROMPT, "guidance_scale": float("nan")}, "guidance_scale", "not a finite number"),
        (
            {"prompt": PROMPT, "scheduler": "plms"},
            "scheduler",
            "choose one of ddim, euler, euler_a, dpmpp_2m",
        ),
        ({"prompt": b"\xff"}, "prompt", "not valid UTF-8"),
        (
            {"prompt": PROMPT, "image": np.zeros((32, 32, 3), np.uint8), "width": 64},
            "width",
            "does not match",
        ),
        ({"prompt": PROMPT, "image": np.zeros((72, 32, 3), np.uint8)}, "image", "72 is outside 16..64"),
        ({"prompt": PROMPT, "image": np.zeros((32, 32), np.uint8)}, "image", "must be uint8 [H, W, 3]"),
        (
            {
                "prompt": PROMPT,
                "image": np.zeros((32, 32, 3), np.uint8),
                "mask": np.zeros((32, 16), np.uint8),
            },
            "mask",
            "does not match",
        ),
        (
            {"prompt": PROMPT, "image": np.zeros((32, 32, 3), np.uint8), "steps": 3, "strength": 0.2},
            "strength",
            "leaves no denoising step",
        ),
    ],
)
def test_check_request_names_the_field(request_: dict, field: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        contract.check_request(request_, limits=DEMO_LIMITS, defaults=DEMO_DEFAULTS)
    assert caught.value.field == field and message in str(caught.value), caught.value
    assert str(caught.value).startswith(f"{field}: ")


def test_check_request_fills_in_the_models_defaults() -> None:
    values = contract.check_request({"prompt": PROMPT}, limits=DEMO_LIMITS, defaults=DEMO_DEFAULTS)
    assert set(values) == {f.name for f in contract.GENERATION_FIELDS}
    assert (values["width"], values["height"], values["steps"]) == (32, 32, 25)
    assert (values["guidance_scale"], values["scheduler"], values["num_images"]) == (5.0, "ddim", 1)
    assert values["seed"] is None and values["negative_prompt"] == "" and values["strength"] == 1.0
    image = np.zeros((48, 16, 3), np.uint8)
    img2img = build_request(limits=DEMO_LIMITS, defaults=DEMO_DEFAULTS, prompt=PROMPT, image=image)
    assert (img2img.width, img2img.height, img2img.strength, img2img.mode) == (16, 48, 0.8, "img2img")
    inpaint = build_request(
        limits=DEMO_LIMITS,
        defaults=DEMO_DEFAULTS,
        prompt=PROMPT,
        image=image,
        mask=np.zeros((48, 16, 1), np.uint8),
    )
    assert (inpaint.strength, inpaint.mode, inpaint.mask.shape) == (1.0, "inpaint", (48, 16))
    assert (
        build_request(
            limits=DEMO_LIMITS, defaults=DEMO_DEFAULTS, prompt=PROMPT, scheduler=" Euler_A"
        ).scheduler
        == "euler_a"
    )


def test_model_contract_check_is_the_submission_check() -> None:
    served = contract.ModelContract(limits=DEMO_LIMITS, defaults=DEMO_DEFAULTS)
    # What issue 9 saw: width 72 passed the REST schema and failed later in Triton.
    assert _rest_accepts({"prompt": PROMPT, "width": 72})
    with pytest.raises(InvalidRequest, match=r"^width: 72 is outside 16\.\.64$") as caught:
        served.check({"prompt": PROMPT, "width": 72})
    assert caught.value.http_status == 422 and caught.value.field == "width"  # a UsageError: 422 problem
    assert served.check({"prompt": PROMPT, "preview_every": 3}, stream=True)["preview_every"] == 3
    assert served.as_dict()["limits"]["max_size"] == 64 and served.as_dict()["defaults"]["width"] == 32


# --------------------------------------------------------------------------- limits in the config


def test_limits_round_trip_through_config_parameters_in_every_json_form() -> None:
    limits = Limits(
        min_size=256, max_size=1024, size_multiple=64, max_steps=80, max_images=4, max_guidance=20.0
    )
    defaults = Defaults(
        width=512, height=768, steps=30, guidance_scale=6.5, scheduler="euler", img2img_strength=0.7
    )
    parameters = contract.config_parameters(limits, defaults)
    python_backend = {"parameters": {k: {"string_value": v} for k, v in parameters.items()}}
    grpc_json = {"config": {"parameters": {k: {"stringValue": v} for k, v in parameters.items()}}}
    for config in (python_backend, grpc_json):
        served = contract.model_limits(config)
        assert served.limits == limits and served.defaults == defaults
    # Older exports lack a parameter that has a default: the default applies.
    del python_backend["parameters"]["limit_max_prompt_chars"]
    assert contract.model_limits(python_backend).limits.max_prompt_chars == 2000
    del python_backend["parameters"]["limit_min_size"]
    with pytest.raises(ValueError, match="limit_min_size"):
        contract.model_limits(python_backend)
    python_backend["parameters"]["limit_min_size"] = {"string_value": "big"}
    with pytest.raises(ValueError, match=r"limit_min_size.*'big'"):
        contract.model_limits(python_backend)


def test_model_limits_must_lie_within_the_envelope() -> None:
    contract.check_limits_within_envelope(DEMO_LIMITS)
    for bad in (
        replace(DEMO_LIMITS, max_steps=151),
        replace(DEMO_LIMITS, min_size=4),
        replace(DEMO_LIMITS, size_multiple=12),
        replace(DEMO_LIMITS, max_size=8192),
    ):
        with pytest.raises(ValueError):
            contract.check_limits_within_envelope(bad)


def test_limits_read_back_from_the_exported_configs(exported_repo: Path) -> None:
    for name, stream in ((contract.MODEL, False), (contract.STREAM_MODEL, True)):
        config = parse_pbtxt((exported_repo / name / "config.pbtxt").read_text())
        as_tritonclient_returns = {"config": json.loads(MessageToJson(config))}
        served = contract.model_limits(as_tritonclient_returns)
        assert served.limits == Limits(min_size=16, max_size=64, size_multiple=8)
        assert served.defaults == Defaults(
            width=32, height=32, steps=25, guidance_scale=5.0, scheduler="ddim"
        )
        # The config's inputs are the contract's fields, in order, with their wire types.
        inputs = [
            (i.name, grpcclient.model_config_pb2.DataType.Name(i.data_type), list(i.dims))
            for i in config.input
        ]
        assert inputs == [
            (f.name, f.config_type, list(f.shape)) for f in contract.input_fields(stream=stream)
        ]
        assert [i.name for i in config.input if not i.optional] == ["prompt"]
        assert config.model_transaction_policy.decoupled is stream


# --------------------------------------------------------------------------- the gRPC client


def test_client_inputs_follow_the_contract() -> None:
    image = np.zeros((16, 24, 3), np.uint8)
    tensors = pipeline_inputs(
        grpcclient, prompt=PROMPT, steps=5, guidance_scale=2.5, seed=2**63 - 1, image=image
    )
    got = {t.name(): (t.datatype(), t.shape()) for t in tensors}
    assert got == {
        "prompt": ("BYTES", [1]),
        "steps": ("INT32", [1]),
        "guidance_scale": ("FP32", [1]),
        "seed": ("INT64", [1]),
        "image": ("UINT8", [16, 24, 3]),
    }
    stream = pipeline_inputs(grpcclient, stream=True, prompt=PROMPT, preview_every=2)
    assert [t.name() for t in stream] == ["prompt", "preview_every"]
    with pytest.raises(TypeError, match="preview_every"):
        pipeline_inputs(grpcclient, prompt=PROMPT, preview_every=2)  # not an input of `pipeline`
    # A value the wire type cannot hold is refused here, not wrapped (2**32 + 5 -> 5 in INT32).
    for name, value in (("steps", 2**32 + 5), ("seed", 2**64), ("num_images", 1.5)):
        with pytest.raises(InvalidArgumentError, match=rf"invalid argument: {name}:"):
            pipeline_inputs(grpcclient, prompt=PROMPT, **{name: value})


def test_stream_errors_map_through_the_one_mapping() -> None:
    """An error response on a stream has no gRPC status, only the message the model wrote."""
    from tritonclient.utils import InferenceServerException

    for message, kind in [
        ("invalid argument: width: 36 is not a multiple of 8", "InvalidArgumentError"),
        ("unavailable: unet: model is not ready", "TritonUnavailableError"),
        ("cancelled: request cancelled by the client after step 3 of 25", "TritonCancelledError"),
        ("something else", "TritonCallError"),
    ]:
        error = triton_error(InferenceServerException(msg=message))
        assert type(error).__name__ == kind and message in str(error)
