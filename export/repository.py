"""``sfumato export``: a diffusers Stable Diffusion folder -> Triton model repository.

Everything is built in a staging folder beside the output and moved into place only when
every network exported, matched PyTorch and got a valid ``config.pbtxt``; a failed export
leaves the output as it was.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Literal

from sfumato import __version__
from sfumato.errors import ParityError, UsageError
from sfumato.export import triton_config as tc
from sfumato.export.networks import NETWORKS, NetworkSpec, file_sha256, network_specs
from sfumato.export.source import SourceInfo, inspect_source
from sfumato.serving import contract
from sfumato.serving.contract import ModelContract

Target = Literal["cpu", "onnxruntime", "tensorrt"]
Precision = Literal["fp32", "fp16"]
TARGETS: tuple[str, ...] = ("cpu", "onnxruntime", "tensorrt")
PRECISIONS: tuple[str, ...] = ("fp32", "fp16")
FP32_TOLERANCE = 1e-4  # max abs error relative to the output's max abs value
MANIFEST = "export_manifest.json"
MODELS = (*NETWORKS, "pipeline", "pipeline_stream")


@dataclass(frozen=True, slots=True)
class ExportOptions:
    """Every setting of one export; also written to the manifest."""

    target: Target = "cpu"
    precision: Precision = "fp32"
    max_batch_size: int = 32
    image_sizes: tuple[tuple[int, int], ...] = ()  # (height, width); empty = the model's native size
    preferred_batch_sizes: tuple[int, ...] = ()  # empty = powers of two from 4 up to max_batch_size
    max_queue_delay_us: int = 2_000
    max_queue_size: int = 256
    queue_timeout_us: int = 30_000_000
    # Instances of each network. None: 2 on cpu (with one ONNX Runtime thread each, so one
    # instance computes while the other moves tensors; measured best on 2 cores), 1 per GPU.
    instance_count: int | None = None
    intra_op_threads: int = 1  # cpu target: ONNX Runtime threads per instance (0 = all cores)
    parity_batches: tuple[int, int] = (1, 3)
    configs_only: bool = False
    tolerance: float = FP32_TOLERANCE
    pipeline_instances: int = 16
    stream_instances: int | None = None  # pipeline_stream instances; None: as many as pipeline
    dynamic_batching: bool = True  # off: each request runs alone (for comparison only)
    default_steps: int = 25
    default_guidance: float = 7.5
    default_scheduler: str | None = None  # None: the source folder's scheduler where we have it


@dataclass(slots=True)
class ExportResult:
    out_dir: Path
    models: list[str]
    manifest: dict = field(default_factory=dict)


def parse_image_size(text: str) -> tuple[int, int]:
    """``"HxW"`` (or a single number for a square) -> ``(height, width)``."""
    parts = text.lower().split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"--image-size {text!r}: expected HxW, e.g. 512x512") from None
    if len(numbers) == 1:
        numbers *= 2
    if len(numbers) != 2 or min(numbers) <= 0:
        raise UsageError(f"--image-size {text!r}: expected HxW with positive numbers, e.g. 512x512")
    return numbers[0], numbers[1]


def _check_options(options: ExportOptions, info: SourceInfo) -> list[tuple[int, int]]:
    if options.target not in TARGETS:
        raise UsageError(f"unsupported target {options.target!r}; choose one of {', '.join(TARGETS)}")
    if options.precision not in PRECISIONS:
        raise UsageError(f"unsupported precision {options.precision!r}; choose fp32 or fp16")
    if options.precision == "fp16" and options.target == "cpu":
        raise UsageError("--precision fp16 needs a GPU target (onnxruntime or tensorrt); cpu runs fp32")
    if options.target == "tensorrt" and not options.configs_only:
        from sfumato.export.tensorrt import require_tensorrt

        require_tensorrt()  # before minutes of export, not after
    if options.instance_count is not None and options.instance_count < 1:
        raise UsageError(f"--instance-count must be at least 1, got {options.instance_count}")
    if options.intra_op_threads < 0:
        raise UsageError(f"--intra-op-threads must be 0 (all cores) or more, got {options.intra_op_threads}")
    for flag, count in (
        ("--pipeline-instances", options.pipeline_instances),
        ("--stream-instances", options.stream_instances),
    ):
        if count is not None and count < 1:
            raise UsageError(f"{flag} must be at least 1, got {count}")
    if options.max_batch_size < 1:
        raise UsageError(f"--max-batch-size must be at least 1, got {options.max_batch_size}")
    sizes = list(options.image_sizes) or [info.native_size]
    multiple = info.pixel_multiple
    for h, w in sizes:
        for side, value in (("height", h), ("width", w)):
            if value % 8:
                raise UsageError(f"--image-size {h}x{w}: {side} {value} is not a multiple of 8")
            if value % multiple:
                raise UsageError(
                    f"--image-size {h}x{w}: {side} {value} is not a multiple of {multiple} "
                    f"(VAE x{info.vae_scale_factor}, UNet x{info.unet_downsample_factor} for this model)"
                )
    return sizes


def _parity_sizes(sizes: list[tuple[int, int]], info: SourceInfo) -> list[tuple[int, int]]:
    """Two spatial sizes: the first two requested, or the first and one step larger."""
    if len(sizes) >= 2:
        return sizes[:2]
    h, w = sizes[0]
    step = info.pixel_multiple
    return [(h, w), (h + step, w + 2 * step)]


def _preferred(options: ExportOptions) -> tuple[int, ...]:
    if options.preferred_batch_sizes:
        return tuple(sorted(b for b in options.preferred_batch_sizes if b <= options.max_batch_size))
    sizes, b = [], 4
    while b <= options.max_batch_size:
        sizes.append(b)
        b *= 2
    return tuple(sizes) or (options.max_batch_size,)


_TRITON_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}


def network_config(
    spec: NetworkSpec, *, options: ExportOptions, info: SourceInfo, sizes: list[tuple[int, int]]
) -> tc.ModelConfig:
    """The ``config.pbtxt`` of one network for the chosen target."""

    def tensor(t, *, reshape: bool) -> tc.Tensor:
        h, w = sizes[0]
        row = t.shape(1, h, w)[1:]
        dims = tuple(-1 if (axis + 1) in t.dynamic_axes else d for axis, d in enumerate(row))
        if not dims:  # a per-row scalar (timestep): Triton carries it as [1]; the model sees [B]
            return tc.Tensor(t.name, _TRITON_TYPES[t.dtype], (1,), reshape=() if reshape else None)
        return tc.Tensor(t.name, _TRITON_TYPES[t.dtype], dims)

    h, w = sizes[0]
    warm_inputs = tuple(
        tc.WarmupInput(
            name=t.name,
            data_type=_TRITON_TYPES[t.dtype],
            dims=t.shape(1, h, w)[1:] or (1,),
            zero_data=t.name == "input_ids",  # random ids could fall outside the vocabulary
        )
        for t in spec.inputs
    )
    common = {
        "name": spec.name,
        "max_batch_size": options.max_batch_size,
        "inputs": tuple(tensor(t, reshape=True) for t in spec.inputs),
        "outputs": tuple(tensor(t, reshape=False) for t in spec.outputs),
        "dynamic_batching": tc.DynamicBatching(
            preferred_batch_sizes=_preferred(options),
            max_queue_delay_microseconds=options.max_queue_delay_us,
            queue_policy=tc.QueuePolicy(
                max_queue_size=options.max_queue_size, timeout_microseconds=options.queue_timeout_us
            ),
        )
        if options.dynamic_batching
        else None,
        "warmup": (tc.Warmup(name=f"{spec.name}_warmup", batch_size=1, inputs=warm_inputs),),
        "parameters": {"sfumato_version": __version__},
        "version_policy": "all",  # a model's versions serve side by side (sfumato.export.versions)
    }
    if options.target == "cpu":
        return tc.ModelConfig(
            backend="python",
            instance_groups=(tc.InstanceGroup("KIND_CPU", options.instance_count or 2),),
            parameters={**common.pop("parameters"), "intra_op_threads": str(options.intra_op_threads)},
            **common,
        )
    if options.target == "onnxruntime":
        return tc.ModelConfig(
            backend="onnxruntime",
            default_model_filename="model.onnx",
            instance_groups=(tc.InstanceGroup("KIND_GPU", options.instance_count or 1),),
            tensorrt_accelerator="FP16" if options.precision == "fp16" else None,
            **common,
        )
    return tc.ModelConfig(
        platform="tensorrt_plan",
        default_model_filename="model.plan",
        instance_groups=(tc.InstanceGroup("KIND_GPU", options.instance_count or 1),),
        **common,
    )


def serving_range(sizes: list[tuple[int, int]], info: SourceInfo, *, explicit: bool) -> tuple[int, int]:
    """Smallest and largest side the pipeline accepts: what export was told, else native/2..native*2."""
    if explicit:
        sides = [side for size in sizes for side in size]
        return min(sides), max(sides)
    multiple = info.pixel_multiple
    native = min(info.native_size)
    low = max(multiple, (native // 2) // multiple * multiple)
    return low, max(info.native_size) * 2


def pipeline_config(options: ExportOptions, *, served: ModelContract, stream: bool = False) -> tc.ModelConfig:
    """``pipeline`` or its decoupled twin ``pipeline_stream``: the contract's inputs (per request,
    no batch axis), its instances running concurrently, the model's limits and defaults
    published in ``parameters`` (the model enforces them; the control plane reads them)."""
    inputs = tuple(
        tc.Tensor(f.name, f.config_type, f.shape, optional=not f.required)
        for f in contract.input_fields(stream=stream)
    )
    outputs = tuple(
        tc.Tensor(o.name, o.config_type, o.shape)
        for o in (contract.STREAM_OUTPUTS if stream else contract.OUTPUTS)
    )
    instances = (
        (options.stream_instances or options.pipeline_instances) if stream else options.pipeline_instances
    )
    return tc.ModelConfig(
        name=contract.STREAM_MODEL if stream else contract.MODEL,
        backend="python",
        max_batch_size=0,
        inputs=inputs,
        outputs=outputs,
        instance_groups=(tc.InstanceGroup("KIND_CPU", instances),),
        parameters={
            "sfumato_version": __version__,
            "network_timeout_ms": "120000",
            **contract.config_parameters(served.limits, served.defaults),
        },
        decoupled=stream,
        version_policy="all",
    )


PIPELINE_MODEL_PY = '''"""Sfumato's text-to-image pipeline; the code is sfumato.serving.triton_pipeline."""

from sfumato.serving.triton_pipeline import TritonPythonModel

__all__ = ["TritonPythonModel"]
'''


def served_contract(
    *, info: SourceInfo, options: ExportOptions, sizes: list[tuple[int, int]]
) -> ModelContract:
    """The limits and defaults the exported model serves with."""
    from sfumato.serving.schedulers import SCHEDULERS, scheduler_for

    scheduler = (
        options.default_scheduler
        or scheduler_for(str(info.scheduler_config.get("_class_name")))
        or "dpmpp_2m"
    )
    if scheduler not in SCHEDULERS:
        raise UsageError(f"--default-scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    low, high = serving_range(sizes, info, explicit=bool(options.image_sizes))
    limits = contract.Limits(min_size=low, max_size=high, size_multiple=info.pixel_multiple)
    try:
        contract.check_limits_within_envelope(limits)
    except ValueError as exc:
        raise UsageError(f"this model cannot be served: {exc}") from None
    height, width = info.native_size
    defaults = contract.Defaults(
        width=min(max(width, low), high),
        height=min(max(height, low), high),
        steps=options.default_steps,
        guidance_scale=options.default_guidance,
        scheduler=scheduler,
    )
    for name, value in (("steps", defaults.steps), ("guidance_scale", defaults.guidance_scale)):
        try:
            contract.check_field(contract.BY_NAME[name], value, limits)
        except contract.InvalidRequest as exc:
            raise UsageError(f"--default-{name.split('_')[0]}: {exc}") from None
    return ModelContract(limits=limits, defaults=defaults)


def write_pipeline_model(
    target: Path,
    *,
    info: SourceInfo,
    options: ExportOptions,
    served: ModelContract,
    stream: bool = False,
) -> None:
    """``pipeline/`` or ``pipeline_stream/``: config, the model.py shim, the tokenizer and
    ``pipeline.json`` (the same files for both; the config says which model it is)."""
    from sfumato.serving.tokenizer import write_serving_tokenizer

    assets = target / "1" / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    length = write_serving_tokenizer(info.path / "tokenizer", assets / "tokenizer.json")
    if length > info.text_length:
        raise UsageError(
            f"{info.path}: the tokenizer pads to {length} tokens "
            f"but the text encoder takes {info.text_length}"
        )
    spec = {
        "model_name": info.path.name,
        "scaling_factor": info.scaling_factor,
        "latent_channels": info.latent_channels,
        "vae_scale_factor": info.vae_scale_factor,
        "scheduler_config": info.scheduler_config,
    }
    (assets / "pipeline.json").write_text(json.dumps(spec, indent=2) + "\n")
    (target / "1" / "model.py").write_text(PIPELINE_MODEL_PY)
    text = pipeline_config(options, served=served, stream=stream).to_pbtxt()
    tc.parse_pbtxt(text)
    (target / "config.pbtxt").write_text(text)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def export_model_repository(src: Path, out: Path, options: ExportOptions) -> ExportResult:
    """Export every network of ``src`` into the Triton model repository ``out``."""
    info = inspect_source(Path(src))
    sizes = _check_options(options, info)
    served = served_contract(info=info, options=options, sizes=sizes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sfumato-export-", dir=out.parent))
    started = time.perf_counter()
    try:
        specs = network_specs(info)
        parity: list[dict] = []
        files: dict[str, str] = {}
        timings: dict[str, float] = {}
        if not options.configs_only:
            from sfumato.export.networks import check_parity, export_onnx
            from sfumato.export.source import load_modules

            _log(f"loading {info.path}")
            modules = load_modules(info)
            t0 = time.perf_counter()
            onnx_paths = export_onnx(modules, info, out_dir=staging / "_onnx")
            timings["onnx_export_s"] = round(time.perf_counter() - t0, 2)
            _log(f"exported ONNX in {timings['onnx_export_s']} s; checking parity with PyTorch")
            t0 = time.perf_counter()
            cases = check_parity(
                modules,
                info,
                onnx_paths=onnx_paths,
                sizes=_parity_sizes(sizes, info),
                batches=options.parity_batches,
            )
            timings["parity_s"] = round(time.perf_counter() - t0, 2)
            del modules
            parity = [{**asdict(c), "relative_error": c.relative_error} for c in cases]
            _print_parity(cases, tolerance=options.tolerance)
            failed = [c for c in cases if c.relative_error > options.tolerance]
            if failed:
                worst = max(failed, key=lambda c: c.relative_error)
                raise ParityError(
                    f"{worst.network} does not match PyTorch: relative error {worst.relative_error:.2e} "
                    f"> {options.tolerance:.0e} at batch {worst.batch}, {worst.height}x{worst.width}"
                )
            for name in NETWORKS:
                version_dir = staging / name / "1"
                version_dir.mkdir(parents=True)
                source_dir = onnx_paths[name].parent
                if options.target == "tensorrt":
                    from sfumato.export.tensorrt import build_engine, build_profile

                    t0 = time.perf_counter()
                    build_engine(
                        onnx_paths[name],
                        version_dir / "model.plan",
                        profile=build_profile(
                            specs[name],
                            max_batch_size=options.max_batch_size,
                            opt_batch=max(_preferred(options)),
                            sizes=sizes,
                        ),
                        fp16=options.precision == "fp16",
                    )
                    timings[f"tensorrt_{name}_s"] = round(time.perf_counter() - t0, 2)
                else:
                    for item in source_dir.iterdir():
                        shutil.move(str(item), version_dir / item.name)
                    if options.target == "cpu":
                        template = resources.files("sfumato.export") / "templates" / "onnx_model.py"
                        (version_dir / "model.py").write_text(template.read_text())
            shutil.rmtree(staging / "_onnx")
        elif options.target == "tensorrt":
            _log("--configs-only: writing configs without engines; build them with TensorRT before serving")
        for name, stream in ((contract.MODEL, False), (contract.STREAM_MODEL, True)):
            write_pipeline_model(staging / name, info=info, options=options, served=served, stream=stream)
        for name in NETWORKS:
            config = network_config(specs[name], options=options, info=info, sizes=sizes)
            text = config.to_pbtxt()
            tc.parse_pbtxt(text)  # what Triton will do on load
            (staging / name).mkdir(exist_ok=True)
            (staging / name / "config.pbtxt").write_text(text)
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                files[str(path.relative_to(staging))] = file_sha256(path)
        timings["total_s"] = round(time.perf_counter() - started, 2)
        manifest = {
            "sfumato_version": __version__,
            "model": info.path.name,  # the registry's name for it (sfumato.model_repository)
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": {
                "path": str(info.path.resolve()),
                "pipeline_class": info.pipeline_class,
                "native_size": list(info.native_size),
                "weights": {
                    str(p.relative_to(info.path)): file_sha256(p)
                    for component in ("text_encoder", "unet", "vae")
                    for p in sorted((info.path / component).iterdir())
                    if p.suffix in {".safetensors", ".bin"}
                },
            },
            "settings": {**asdict(options), "image_sizes": [list(s) for s in sizes]},
            "export_options": asdict(options),  # as given: what a new version re-exports with
            "parity": {
                "tolerance_relative": options.tolerance,
                "measured_on": "ONNX Runtime CPU, fp32 graph" if parity else "not run (--configs-only)",
                "fp16_note": (
                    "fp16 is applied by TensorRT when the engine is built (tensorrt) or by the TensorRT "
                    "execution provider at load (onnxruntime); the fp32 graph above is what was checked"
                    if options.precision == "fp16"
                    else None
                ),
                "cases": parity,
            },
            "timings": timings,
            "files": files,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _install(staging, out, names=[*MODELS, MANIFEST])
        return ExportResult(out_dir=out, models=list(MODELS), manifest=manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _install(staging: Path, out: Path, *, names: list[str]) -> None:
    """Move the staged models over the old ones; the old ones go only once all new ones are in."""
    trash = Path(tempfile.mkdtemp(prefix=".sfumato-old-", dir=out.parent))
    try:
        for name in names:
            if (out / name).exists():
                (out / name).rename(trash / name)
            (staging / name).rename(out / name)
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _print_parity(cases: list, *, tolerance: float) -> None:
    _log(f"{'network':<13} {'batch':>5} {'size':>9} {'max abs err':>12} {'scale':>8} {'relative':>10}")
    for c in cases:
        flag = "" if c.relative_error <= tolerance else "  FAIL"
        _log(
            f"{c.network:<13} {c.batch:>5} {f'{c.height}x{c.width}':>9} {c.max_abs_error:>12.3e} "
            f"{c.output_scale:>8.3f} {c.relative_error:>10.2e}{flag}"
        )
