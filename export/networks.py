"""The four exported networks: their tensor contracts, ONNX export and parity with PyTorch.

Tensor names are a public contract (the ``pipeline`` model and power users call them):

* ``text_encoder``: ``input_ids`` INT64 ``[B, L]`` -> ``last_hidden_state`` ``[B, L, D]``,
  ``pooler_output`` ``[B, D]``
* ``unet``: ``sample`` ``[B, C, h, w]``, ``timestep`` ``[B]``, ``encoder_hidden_states``
  ``[B, L, D]`` -> ``out_sample`` ``[B, C, h, w]``
* ``vae_encoder``: ``image`` ``[B, 3, H, W]`` in [-1, 1] -> ``latent_parameters``
  ``[B, 2C, h, w]`` (mean and log-variance, diffusers' ``DiagonalGaussianDistribution``) and
  ``latent_mean`` ``[B, C, h, w]``; both unscaled (multiply by the VAE scaling factor)
* ``vae_decoder``: ``latent`` ``[B, C, h, w]`` (unscaled) -> ``image`` ``[B, 3, H, W]`` in [-1, 1]

The batch axis and the spatial axes are dynamic.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sfumato.export.source import SourceInfo, SourceModules

NETWORKS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
ONNX_OPSET = 17
_TWO_GB = 2**31


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """An ONNX input or output; ``shape`` is a function of (batch, pixel height, pixel width)."""

    name: str
    dtype: str  # numpy dtype name
    shape: Callable[[int, int, int], tuple[int, ...]]
    dynamic_axes: dict[int, str]


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    spatial: bool  # whether the image size matters to this network


def network_specs(info: SourceInfo) -> dict[str, NetworkSpec]:
    s = info.vae_scale_factor
    c, seq, hidden = info.latent_channels, info.text_length, info.text_hidden
    lat = {0: "batch", 2: "latent_height", 3: "latent_width"}
    pix = {0: "batch", 2: "height", 3: "width"}
    return {
        "text_encoder": NetworkSpec(
            "text_encoder",
            inputs=(TensorSpec("input_ids", "int64", lambda b, h, w: (b, seq), {0: "batch"}),),
            outputs=(
                TensorSpec("last_hidden_state", "float32", lambda b, h, w: (b, seq, hidden), {0: "batch"}),
                TensorSpec("pooler_output", "float32", lambda b, h, w: (b, hidden), {0: "batch"}),
            ),
            spatial=False,
        ),
        "unet": NetworkSpec(
            "unet",
            inputs=(
                TensorSpec("sample", "float32", lambda b, h, w: (b, c, h // s, w // s), lat),
                TensorSpec("timestep", "float32", lambda b, h, w: (b,), {0: "batch"}),
                TensorSpec(
                    "encoder_hidden_states", "float32", lambda b, h, w: (b, seq, hidden), {0: "batch"}
                ),
            ),
            outputs=(TensorSpec("out_sample", "float32", lambda b, h, w: (b, c, h // s, w // s), lat),),
            spatial=True,
        ),
        "vae_encoder": NetworkSpec(
            "vae_encoder",
            inputs=(TensorSpec("image", "float32", lambda b, h, w: (b, 3, h, w), pix),),
            outputs=(
                TensorSpec("latent_parameters", "float32", lambda b, h, w: (b, 2 * c, h // s, w // s), lat),
                TensorSpec("latent_mean", "float32", lambda b, h, w: (b, c, h // s, w // s), lat),
            ),
            spatial=True,
        ),
        "vae_decoder": NetworkSpec(
            "vae_decoder",
            inputs=(TensorSpec("latent", "float32", lambda b, h, w: (b, c, h // s, w // s), lat),),
            outputs=(TensorSpec("image", "float32", lambda b, h, w: (b, 3, h, w), pix),),
            spatial=True,
        ),
    }


def _wrappers(modules: SourceModules) -> dict[str, Any]:
    """``torch.nn.Module`` wrappers whose forward has exactly the contract's inputs and outputs."""
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.model(input_ids=input_ids, return_dict=True)
            return out.last_hidden_state, out.pooler_output

    class UNet(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
        ) -> torch.Tensor:
            return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    class VaeEncoder(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            moments = self.model.encoder(image)
            if self.model.quant_conv is not None:
                moments = self.model.quant_conv(moments)
            mean, _ = torch.chunk(moments, 2, dim=1)
            return moments, mean

    class VaeDecoder(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, latent: torch.Tensor) -> torch.Tensor:
            return self.model.decode(latent, return_dict=False)[0]

    return {
        "text_encoder": TextEncoder(modules.text_encoder).eval(),
        "unet": UNet(modules.unet).eval(),
        "vae_encoder": VaeEncoder(modules.vae).eval(),
        "vae_decoder": VaeDecoder(modules.vae).eval(),
    }


def random_inputs(
    spec: NetworkSpec, *, batch: int, height: int, width: int, vocab_size: int, seed: int
) -> dict[str, np.ndarray]:
    """Random inputs of the contract's shapes, in each input's natural range."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for tensor in spec.inputs:
        shape = tensor.shape(batch, height, width)
        if tensor.name == "input_ids":
            out[tensor.name] = rng.integers(0, vocab_size, size=shape, dtype=np.int64)
        elif tensor.name == "timestep":
            out[tensor.name] = rng.uniform(0, 999, size=shape).astype(np.float32)
        elif tensor.name == "image":
            out[tensor.name] = rng.uniform(-1, 1, size=shape).astype(np.float32)
        else:
            out[tensor.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def export_onnx(
    modules: SourceModules, info: SourceInfo, *, out_dir: Path, networks: tuple[str, ...] = NETWORKS
) -> dict[str, Path]:
    """Export each network to ``out_dir/<name>/model.onnx`` (external data past 2 GB)."""
    import torch

    specs = network_specs(info)
    wrappers = _wrappers(modules)
    h, w = info.native_size
    written: dict[str, Path] = {}
    for name in networks:
        spec, module = specs[name], wrappers[name]
        example = random_inputs(spec, batch=2, height=h, width=w, vocab_size=_vocab_size(info), seed=0)
        args = tuple(torch.from_numpy(example[t.name]) for t in spec.inputs)
        target = out_dir / name / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        parameters = sum(p.numel() * p.element_size() for p in module.parameters())
        with torch.inference_mode(), warnings.catch_warnings():
            # Tracing warns about every Python branch on a shape; the parity check is what
            # proves the graph right at other batch and image sizes.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Constant folding")
            torch.onnx.export(
                module,
                args,
                str(target),
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes={t.name: t.dynamic_axes for t in (*spec.inputs, *spec.outputs)},
                opset_version=ONNX_OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        if parameters >= _TWO_GB or any(p.name != "model.onnx" for p in target.parent.iterdir()):
            _consolidate_external_data(target)
        written[name] = target
    return written


def _consolidate_external_data(target: Path) -> None:
    """Gather the tensors of a >2 GB export into one ``model.onnx.data`` beside the graph.

    The exporter writes one file per initializer for large models; one data file is what
    Triton's onnxruntime backend and TensorRT's parser expect to find next to the model.
    """
    import onnx

    model = onnx.load(str(target), load_external_data=True)
    for stray in target.parent.iterdir():
        if stray != target:
            stray.unlink()
    onnx.save_model(
        model,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )


def _vocab_size(info: SourceInfo) -> int:
    return int(info.text_encoder_config.get("vocab_size", 49408))


@dataclass(frozen=True, slots=True)
class ParityCase:
    network: str
    batch: int
    height: int
    width: int
    max_abs_error: float
    output_scale: float

    @property
    def relative_error(self) -> float:
        return self.max_abs_error / max(self.output_scale, 1e-12)


def check_parity(
    modules: SourceModules,
    info: SourceInfo,
    *,
    onnx_paths: dict[str, Path],
    sizes: list[tuple[int, int]],
    batches: tuple[int, ...] = (1, 3),
    fp16_models: dict[str, Path] | None = None,
) -> list[ParityCase]:
    """Run every exported network in ONNX Runtime and in PyTorch on the same random inputs.

    Each network is checked at every batch size and (for spatial networks) every image size.
    The error is the max abs difference over all outputs, and the scale the max abs value of
    the PyTorch outputs, so ``relative_error`` is comparable across networks.
    """
    import onnxruntime as ort
    import torch

    specs = network_specs(info)
    wrappers = _wrappers(modules)
    cases: list[ParityCase] = []
    options = ort.SessionOptions()
    options.log_severity_level = 3
    for name, path in onnx_paths.items():
        spec, module = specs[name], wrappers[name]
        model_path = (fp16_models or {}).get(name, path)
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        for batch in batches:
            for height, width in sizes if spec.spatial else sizes[:1]:
                inputs = random_inputs(
                    spec, batch=batch, height=height, width=width, vocab_size=_vocab_size(info), seed=batch
                )
                with torch.inference_mode():
                    expected = module(*(torch.from_numpy(inputs[t.name]) for t in spec.inputs))
                expected = expected if isinstance(expected, tuple) else (expected,)
                actual = session.run([t.name for t in spec.outputs], inputs)
                error = max(
                    float(np.max(np.abs(a.astype(np.float32) - e.numpy())))
                    for a, e in zip(actual, expected, strict=True)
                )
                scale = max(float(e.abs().max()) for e in expected)
                cases.append(ParityCase(name, batch, height, width, error, scale))
    return cases


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
