"""Typed Triton model configurations, rendered to ``config.pbtxt``.

The dataclasses say what Sfumato configures; rendering goes through Triton's own
``ModelConfig`` protobuf (shipped in ``tritonclient``), so every file we write is one Triton
parses, field names and enum values included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

DataType = Literal["TYPE_FP32", "TYPE_FP16", "TYPE_INT32", "TYPE_INT64", "TYPE_UINT8", "TYPE_STRING"]


@dataclass(frozen=True, slots=True)
class Tensor:
    """One input or output, without the batch dimension (``-1`` = dynamic)."""

    name: str
    data_type: DataType
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None  # what the backend sees per row, if not ``dims``
    optional: bool = False


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """Back-pressure: a bounded queue, and requests that wait too long are rejected."""

    max_queue_size: int = 256
    timeout_microseconds: int = 30_000_000
    allow_timeout_override: bool = True


@dataclass(frozen=True, slots=True)
class DynamicBatching:
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_microseconds: int = 2_000
    queue_policy: QueuePolicy | None = field(default_factory=QueuePolicy)


@dataclass(frozen=True, slots=True)
class InstanceGroup:
    kind: Literal["KIND_CPU", "KIND_GPU", "KIND_AUTO"] = "KIND_AUTO"
    count: int = 1


@dataclass(frozen=True, slots=True)
class WarmupInput:
    name: str
    data_type: DataType
    dims: tuple[int, ...]
    zero_data: bool = False  # zeros, else random data


@dataclass(frozen=True, slots=True)
class Warmup:
    name: str
    batch_size: int
    inputs: tuple[WarmupInput, ...]
    count: int = 1


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    max_batch_size: int
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    backend: str | None = None
    platform: str | None = None
    default_model_filename: str | None = None
    dynamic_batching: DynamicBatching | None = None
    instance_groups: tuple[InstanceGroup, ...] = ()
    parameters: dict[str, str] = field(default_factory=dict)
    warmup: tuple[Warmup, ...] = ()
    tensorrt_accelerator: Literal["FP32", "FP16"] | None = None  # onnxruntime backend + TRT EP
    # Decoupled: any number of responses per request (streaming gRPC only), ended by a final flag.
    decoupled: bool = False
    # Which version folders Triton serves: "all" serves every numbered folder side by side (a
    # model's versions, sfumato.export.versions); "latest" (Triton's default) only the highest.
    version_policy: Literal["latest", "all"] = "latest"

    def to_proto(self) -> pb.ModelConfig:
        config = pb.ModelConfig(name=self.name, max_batch_size=self.max_batch_size)
        if self.backend:
            config.backend = self.backend
        if self.platform:
            config.platform = self.platform
        if self.default_model_filename:
            config.default_model_filename = self.default_model_filename
        for tensor, target in [(t, config.input) for t in self.inputs] + [
            (t, config.output) for t in self.outputs
        ]:
            item = target.add(name=tensor.name, data_type=pb.DataType.Value(tensor.data_type))
            item.dims.extend(tensor.dims)
            if tensor.reshape is not None:
                item.reshape.shape.extend(tensor.reshape)
            if tensor.optional:
                item.optional = True
        if self.dynamic_batching is not None:
            batching = self.dynamic_batching
            config.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
            config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_microseconds
            if batching.queue_policy is not None:
                policy = config.dynamic_batching.default_queue_policy
                policy.timeout_action = pb.ModelQueuePolicy.REJECT
                policy.default_timeout_microseconds = batching.queue_policy.timeout_microseconds
                policy.allow_timeout_override = batching.queue_policy.allow_timeout_override
                policy.max_queue_size = batching.queue_policy.max_queue_size
        for group in self.instance_groups:
            config.instance_group.add(kind=pb.ModelInstanceGroup.Kind.Value(group.kind), count=group.count)
        if self.decoupled:
            config.model_transaction_policy.decoupled = True
        if self.version_policy == "all":
            config.version_policy.all.SetInParent()
        for key, value in self.parameters.items():
            config.parameters[key].string_value = value
        for warm in self.warmup:
            sample = config.model_warmup.add(name=warm.name, batch_size=warm.batch_size, count=warm.count)
            for inp in warm.inputs:
                spec = sample.inputs[inp.name]
                spec.data_type = pb.DataType.Value(inp.data_type)
                spec.dims.extend(inp.dims)
                if inp.zero_data:
                    spec.zero_data = True
                else:
                    spec.random_data = True
        if self.tensorrt_accelerator is not None:
            accel = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            accel.parameters["precision_mode"] = self.tensorrt_accelerator
            accel.parameters["max_workspace_size_bytes"] = str(4 << 30)
        return config

    def to_pbtxt(self) -> str:
        return text_format.MessageToString(self.to_proto())


def parse_pbtxt(text: str) -> pb.ModelConfig:
    """Parse a ``config.pbtxt`` the way Triton does; raises on any unknown field or bad value."""
    return text_format.Parse(text, pb.ModelConfig())
