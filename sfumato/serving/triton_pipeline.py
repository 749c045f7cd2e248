"""The Triton ``pipeline`` model (python backend): prompt in, ``uint8`` images out.

``sfumato export`` writes ``pipeline/1/model.py`` as a one-line import of
:class:`TritonPythonModel` from here, so the model in the repository and the tested code are
the same file. The networks are called through BLS (``pb_utils.InferenceRequest(...).exec()``)
as separate Triton models, so their dynamic batchers batch the rows of every request in
flight; several pipeline instances (``instance_group``) keep that many requests in flight.

Contract (inputs ``[1]`` per request unless noted; all optional but ``prompt``):
``prompt`` BYTES, ``negative_prompt`` BYTES, ``num_images`` INT32, ``steps`` INT32,
``guidance_scale`` FP32, ``seed`` INT64, ``width`` INT32, ``height`` INT32, ``scheduler`` BYTES,
``image`` UINT8 ``[H, W, 3]``, ``mask`` UINT8 ``[H, W]`` (255 = repaint), ``strength`` FP32.
Outputs: ``images`` UINT8 ``[N, H, W, 3]``, ``seeds`` INT64 ``[N]``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from sfumato.serving import contract
from sfumato.serving.pipeline import Cancelled, DiffusionPipeline
from sfumato.serving.request import InvalidRequest, build_request


class NetworkError(RuntimeError):
    """A BLS call to one of the network models failed."""


class BlsNetworks:
    """The four networks as Triton models, called with BLS from inside the pipeline model."""

    def __init__(self, pb_utils: Any, *, timeout_ms: int) -> None:
        self._pb = pb_utils
        self._timeout_us = timeout_ms * 1000

    def _call(self, model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
        pb = self._pb
        request = pb.InferenceRequest(
            model_name=model,
            inputs=[pb.Tensor(name, np.ascontiguousarray(value)) for name, value in inputs.items()],
            requested_output_names=[output],
            timeout=self._timeout_us,
        )
        response = request.exec()
        if response.has_error():
            raise NetworkError(f"{model}: {response.error().message()}")
        return pb.get_output_tensor_by_name(response, output).as_numpy()

    def text_encoder(self, input_ids: np.ndarray) -> np.ndarray:
        return self._call("text_encoder", {"input_ids": input_ids}, "last_hidden_state")

    def unet(self, sample: np.ndarray, timestep: np.ndarray, encoder_hidden_states: np.ndarray) -> np.ndarray:
        return self._call(
            "unet",
            {
                "sample": sample,
                "timestep": timestep.reshape(-1, 1),
                "encoder_hidden_states": encoder_hidden_states,
            },
            "out_sample",
        )

    def vae_encoder(self, image: np.ndarray) -> np.ndarray:
        return self._call("vae_encoder", {"image": image}, "latent_parameters")

    def vae_decoder(self, latent: np.ndarray) -> np.ndarray:
        return self._call("vae_decoder", {"latent": latent}, "image")


def _scalar(array: np.ndarray, kind: type, name: str) -> Any:
    if array.size != 1:
        raise InvalidRequest(name, f"expected one value, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    if kind is str:
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(name, "is not valid UTF-8") from None
        return str(value)
    return kind(value)


class TritonPythonModel:
    """Python-backend entry point; one instance per ``instance_group`` count."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.logger = pb_utils.Logger
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        assets = Path(args["model_repository"]) / args["model_version"] / "assets"
        timeout_ms = int(parameters.get("network_timeout_ms", "120000"))
        self.pipeline = DiffusionPipeline.from_assets(
            assets, networks=BlsNetworks(pb_utils, timeout_ms=timeout_ms)
        )

    def _parse(self, request: Any):
        fields: dict[str, Any] = {}
        for name, datatype in contract.SCALAR_INPUTS.items():
            tensor = self.pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                fields[name] = _scalar(tensor.as_numpy(), contract.python_type(datatype), name)
        for name in contract.ARRAY_INPUTS:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                fields[name] = tensor.as_numpy()
        spec = self.pipeline.spec
        return build_request(limits=spec.limits, defaults=spec.defaults, **fields)

    def execute(self, requests: list) -> list:
        pb = self.pb
        responses = []
        for request in requests:
            try:
                generation = self._parse(request)
                is_cancelled = getattr(request, "is_cancelled", lambda: False)
                result = self.pipeline(generation, cancelled=is_cancelled)
                responses.append(
                    pb.InferenceResponse(
                        output_tensors=[pb.Tensor("images", result.images), pb.Tensor("seeds", result.seeds)]
                    )
                )
            except InvalidRequest as exc:
                responses.append(
                    pb.InferenceResponse(
                        error=pb.TritonError(f"invalid argument: {exc}", pb.TritonError.INVALID_ARG)
                    )
                )
            except Cancelled as exc:
                responses.append(
                    pb.InferenceResponse(error=pb.TritonError(str(exc), pb.TritonError.CANCELLED))
                )
            except NetworkError as exc:
                self.logger.log_error(f"pipeline: {exc}")
                responses.append(
                    pb.InferenceResponse(error=pb.TritonError(str(exc), pb.TritonError.UNAVAILABLE))
                )
            except Exception as exc:  # a bug: log the traceback, fail this request only
                logging.getLogger("sfumato.pipeline").exception("pipeline request failed")
                responses.append(pb.InferenceResponse(error=pb.TritonError(f"internal error: {exc!r}")))
        return responses
