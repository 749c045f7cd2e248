"""Triton python-backend model that runs one exported ONNX network with ONNX Runtime.

Written by ``sfumato export --target cpu`` as ``<model>/1/model.py`` next to ``model.onnx``.
Triton's dynamic batcher hands ``execute`` several requests at once; they are stacked along
the batch axis into one ONNX Runtime call per group of equal per-row shapes (requests for
different image sizes cannot share a tensor) and the result is split back, one response per
request. A request with a bad input gets an error response of its own; the others still run.

Model parameters (``config.pbtxt``): ``intra_op_threads`` (0 = ONNX Runtime's default).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

_NUMPY_TYPES = {
    "TYPE_FP32": np.float32,
    "TYPE_FP16": np.float16,
    "TYPE_INT64": np.int64,
    "TYPE_INT32": np.int32,
    "TYPE_UINT8": np.uint8,
}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_threads", "0"))
        # Several models and many pipeline stubs share the cores: idle ONNX Runtime threads
        # must sleep, not spin (spinning starves the other processes and halves throughput).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(version_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = []
        for spec in config["input"]:
            reshape = spec.get("reshape", {}).get("shape") if "reshape" in spec else None
            row_shape = tuple(int(d) for d in (reshape if reshape is not None else spec["dims"]))
            self.inputs.append((spec["name"], _NUMPY_TYPES[spec["data_type"]], row_shape))
        self.outputs = [spec["name"] for spec in config["output"]]

    def _read(self, request) -> dict[str, np.ndarray]:
        arrays = {}
        for name, dtype, row_shape in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input {name!r}")
            array = tensor.as_numpy()
            if array.dtype != dtype:
                raise ValueError(f"input {name!r} must be {np.dtype(dtype).name}, got {array.dtype}")
            rows = array.shape[0]
            array = array.reshape((rows, *row_shape)) if row_shape == () else array
            arrays[name] = array
        counts = {a.shape[0] for a in arrays.values()}
        if len(counts) != 1:
            raise ValueError(f"inputs disagree on the batch size: {sorted(counts)}")
        return arrays

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = {}
        for i, request in enumerate(requests):
            try:
                arrays = self._read(request)
            except ValueError as exc:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
                continue
            key = tuple(arrays[name].shape[1:] for name, _, _ in self.inputs)
            groups.setdefault(key, []).append((i, arrays))
        for members in groups.values():
            feed = {
                name: np.concatenate([arrays[name] for _, arrays in members], axis=0)
                for name, _, _ in self.inputs
            }
            try:
                results = self.session.run(self.outputs, feed)
            except Exception as exc:  # ONNX Runtime reports shape errors this way
                for i, _ in members:
                    responses[i] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"onnxruntime: {exc}")
                    )
                continue
            start = 0
            for i, arrays in members:
                rows = next(iter(arrays.values())).shape[0]
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor(name, np.ascontiguousarray(result[start : start + rows]))
                        for name, result in zip(self.outputs, results, strict=True)
                    ]
                )
                start += rows
        return responses
