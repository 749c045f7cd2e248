"""TensorRT engine builds (``--target tensorrt``) with TensorRT's Python API.

One optimization profile per engine covers batch 1..``max_batch_size`` (optimum at the
largest preferred batch) and every requested image size (min / max over them, optimum at the
first). TensorRT is imported lazily: without it, export raises a :class:`MissingDependencyError`
unless only the configs are asked for (``--configs-only``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sfumato.errors import MissingDependencyError, SfumatoError
from sfumato.export.networks import NetworkSpec


@dataclass(frozen=True, slots=True)
class Profile:
    """min / opt / max shapes of every input of one engine."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def require_tensorrt():  # -> module
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError(
            "--target tensorrt needs the 'tensorrt' Python package (NVIDIA TensorRT >= 8.6) on a machine "
            "with an NVIDIA GPU; install it, use --target onnxruntime, or pass --configs-only to write "
            "only the Triton configs"
        ) from exc
    return tensorrt


def build_profile(
    spec: NetworkSpec, *, max_batch_size: int, opt_batch: int, sizes: list[tuple[int, int]]
) -> Profile:
    heights = [h for h, _ in sizes]
    widths = [w for _, w in sizes]
    lo = (min(heights), min(widths))
    hi = (max(heights), max(widths))
    opt = sizes[0]
    shapes = {}
    for tensor in spec.inputs:
        shapes[tensor.name] = (
            tensor.shape(1, *lo),
            tensor.shape(opt_batch, *opt),
            tensor.shape(max_batch_size, *hi),
        )
    return Profile(shapes=shapes)


def build_engine(
    onnx_path: Path, plan_path: Path, *, profile: Profile, fp16: bool, workspace_gib: int = 4
) -> None:
    """Parse ``onnx_path`` (external data beside it is found by path) and serialize an engine."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SfumatoError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    optimization = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.shapes.items():
        optimization.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(optimization)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SfumatoError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    plan_path.write_bytes(bytes(serialized))
