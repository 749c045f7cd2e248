"""The Triton ``pipeline`` and ``pipeline_stream`` models (python backend): prompt in, ``uint8``
images out.

``sfumato export`` writes both models' ``model.py`` as the same one-line import of
:class:`TritonPythonModel` from here, so the models in the repository and the tested code are
the same file; the model reads its config to know which one it is. The networks are called
through BLS (``pb_utils.InferenceRequest(...).exec()``) as separate Triton models, so their
dynamic batchers batch the rows of every request in flight, whichever of the two models sent
them; several instances of each (``instance_group``) keep that many requests in flight.

* ``pipeline`` is a plain model: one response per request, ``images`` and ``seeds``.
* ``pipeline_stream`` is decoupled (``model_transaction_policy { decoupled: true }``; Triton
  serves it over streaming gRPC only): one response per denoising step with ``step`` and
  ``total`` (and ``preview`` every ``preview_every`` steps when asked), then ``images`` and
  ``seeds`` with the final flag. Cancelling the stream stops the loop at the next step.

Inputs are the contract's fields (``sfumato.serving.contract``); the model's limits and
defaults are read from its own config ``parameters``, the ones the control plane reads. A bad
field, a missing ``prompt`` included, is an ``INVALID_ARGUMENT`` error naming it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from sfumato.serving import contract
from sfumato.serving.contract import InvalidRequest
from sfumato.serving.pipeline import Cancelled, DiffusionPipeline, Progress
from sfumato.serving.request import GenerationRequest, build_request


class NetworkError(RuntimeError):
    """A BLS call to one of the network models failed."""


class BlsNetworks:
    """The four networks as Triton models, called with BLS from inside the pipeline model.

    ``names`` maps each network to its Triton model (a model's own networks, e.g.
    ``shapes-pink__unet``; the bare names by default) and ``version`` pins the version called:
    a pipeline version calls the networks of the same version, so that two versions of a model
    serve side by side, each with its own weights (``sfumato.export.versions``)."""

    def __init__(
        self, pb_utils: Any, *, timeout_ms: int, names: dict[str, str] | None = None, version: int = -1
    ) -> None:
        self._pb = pb_utils
        self._timeout_us = timeout_ms * 1000
        self._names = names or {}
        self._version = version

    def _call(self, model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
        pb = self._pb
        model = self._names.get(model, model)
        request = pb.InferenceRequest(
            model_name=model,
            model_version=self._version,
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
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.name = config.get("name", contract.MODEL)
        try:
            self.served = contract.model_limits(config)
        except ValueError as exc:
            raise ValueError(f"{exc}: export the model again with this version of sfumato") from None
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        assets = Path(args["model_repository"]) / args["model_version"] / "assets"
        timeout_ms = int(parameters.get("network_timeout_ms", "120000"))
        spec = json.loads((assets / "pipeline.json").read_text())
        networks = BlsNetworks(
            pb_utils,
            timeout_ms=timeout_ms,
            names=dict(spec.get("networks") or {}),
            version=int(args["model_version"]),
        )
        self.pipeline = DiffusionPipeline.from_assets(assets, networks=networks)

    def _parse(self, request: Any) -> tuple[GenerationRequest, int]:
        fields: dict[str, Any] = {}
        for field in contract.input_fields(stream=self.decoupled):
            tensor = self.pb.get_input_tensor_by_name(request, field.name)
            if tensor is None:
                continue
            array = tensor.as_numpy()
            fields[field.name] = array if field.is_array else _scalar(array, field.python_type, field.name)
        limits, defaults = self.served.limits, self.served.defaults
        preview_every = contract.check_field(
            contract.BY_NAME["preview_every"], fields.pop("preview_every", None), limits
        )
        return build_request(limits=limits, defaults=defaults, **fields), preview_every or 0

    def _error(self, exc: Exception, request: Any) -> Any:
        """The error for a failed request. Its message starts with the status in words
        (``invalid argument:``, ``cancelled:``, ``unavailable:``, ``internal error:``): a
        response on a gRPC stream carries the message only, and the client reads it back
        (``sfumato.clients.triton_grpc.triton_error``)."""
        pb = self.pb
        if isinstance(exc, InvalidRequest):
            return pb.TritonError(f"invalid argument: {exc}", pb.TritonError.INVALID_ARG)
        if isinstance(exc, Cancelled):
            self.logger.log_info(f"{self.name}: request {request.request_id()!r}: {exc}")
            return pb.TritonError(f"cancelled: {exc}", pb.TritonError.CANCELLED)
        if isinstance(exc, NetworkError):
            self.logger.log_error(f"{self.name}: {exc}")
            return pb.TritonError(f"unavailable: {exc}", pb.TritonError.UNAVAILABLE)
        # a bug: log the traceback, fail this request only
        logging.getLogger("sfumato.pipeline").exception("%s request failed", self.name)
        return pb.TritonError(f"internal error: {exc!r}")

    def _images(self, result: Any) -> list:
        return [self.pb.Tensor("images", result.images), self.pb.Tensor("seeds", result.seeds)]

    def execute(self, requests: list) -> list | None:
        if self.decoupled:
            for request in requests:
                self._stream(request)
            return None
        pb = self.pb
        responses = []
        for request in requests:
            try:
                generation, _ = self._parse(request)
                is_cancelled = getattr(request, "is_cancelled", lambda: False)
                result = self.pipeline(generation, cancelled=is_cancelled)
                responses.append(pb.InferenceResponse(output_tensors=self._images(result)))
            except Exception as exc:
                responses.append(pb.InferenceResponse(error=self._error(exc, request)))
        return responses

    def _stream(self, request: Any) -> None:
        """``pipeline_stream``: the progress responses, then the images with the final flag."""
        pb = self.pb
        sender = request.get_response_sender()
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL

        def on_step(progress: Progress) -> None:
            if sender.is_cancelled():  # send nothing more
                raise Cancelled(
                    f"request cancelled by the client after step {progress.step} of {progress.total}"
                )
            tensors = [
                pb.Tensor("step", np.array([progress.step], dtype=np.int32)),
                pb.Tensor("total", np.array([progress.total], dtype=np.int32)),
            ]
            if progress.preview is not None:
                tensors.append(pb.Tensor("preview", progress.preview))
            sender.send(pb.InferenceResponse(output_tensors=tensors))

        try:
            generation, preview_every = self._parse(request)
            result = self.pipeline(
                generation, cancelled=sender.is_cancelled, on_step=on_step, preview_every=preview_every
            )
            response = pb.InferenceResponse(output_tensors=self._images(result))
        except Exception as exc:
            response = pb.InferenceResponse(error=self._error(exc, request))
        try:
            sender.send(response, flags=final)
        except Exception:  # the stream is gone (cancelled, client closed)
            logging.getLogger("sfumato.pipeline").info("%s: final response not delivered", self.name)
            # Triton releases a decoupled request only on the final flag: without it the request
            # stays in flight and the model can never unload. Send the flag alone.
            with contextlib.suppress(Exception):
                sender.send(flags=final)
