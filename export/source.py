"""Reading a diffusers Stable Diffusion folder: validation first, then the PyTorch modules.

Validation reads only JSON, so a wrong folder fails in milliseconds with a message that
names what is missing, before PyTorch is even imported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sfumato.errors import InvalidSourceError

REQUIRED_COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What export needs to know about a pipeline folder before loading any weights."""

    path: Path
    pipeline_class: str
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    text_encoder_config: dict[str, Any]
    scheduler_config: dict[str, Any]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def unet_downsample_factor(self) -> int:
        return 2 ** (len(self.unet_config["block_out_channels"]) - 1)

    @property
    def pixel_multiple(self) -> int:
        """Width and height must be multiples of this (and of 8, as every SD pipeline assumes)."""
        return max(8, self.vae_scale_factor * self.unet_downsample_factor)

    @property
    def native_size(self) -> tuple[int, int]:
        sample = self.unet_config["sample_size"]
        h, w = (sample, sample) if isinstance(sample, int) else sample
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.unet_config["in_channels"])

    @property
    def text_length(self) -> int:
        return int(self.text_encoder_config["max_position_embeddings"])

    @property
    def text_hidden(self) -> int:
        return int(self.text_encoder_config["hidden_size"])

    @property
    def scaling_factor(self) -> float:
        return float(self.vae_config.get("scaling_factor", 0.18215))


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise InvalidSourceError(f"missing {what}: {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidSourceError(f"unreadable {what} {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidSourceError(f"{what} {path} is not a JSON object")
    return data


def inspect_source(path: Path) -> SourceInfo:
    """Check that ``path`` is a diffusers Stable Diffusion folder with every component we export."""
    path = Path(path)
    if not path.is_dir():
        raise InvalidSourceError(f"{path} is not a folder")
    index = path / "model_index.json"
    if not index.is_file():
        raise InvalidSourceError(f"{path} is not a diffusers pipeline folder: no model_index.json")
    model_index = _read_json(index, "model_index.json")
    pipeline_class = str(model_index.get("_class_name", ""))
    for component in REQUIRED_COMPONENTS:
        entry = model_index.get(component)
        if not isinstance(entry, list) or entry[0] is None:
            raise InvalidSourceError(f"{path}: model_index.json names no {component!r} component")
        if not (path / component).is_dir():
            raise InvalidSourceError(f"{path}: missing component folder {component}/")
    for component in ("text_encoder", "unet", "vae"):
        weights = [
            p for p in (path / component).iterdir() if p.suffix in {".safetensors", ".bin"} and p.is_file()
        ]
        if not weights:
            raise InvalidSourceError(f"{path}: {component}/ holds no weights (.safetensors or .bin)")
    return SourceInfo(
        path=path,
        pipeline_class=pipeline_class,
        unet_config=_read_json(path / "unet" / "config.json", "unet config"),
        vae_config=_read_json(path / "vae" / "config.json", "vae config"),
        text_encoder_config=_read_json(path / "text_encoder" / "config.json", "text_encoder config"),
        scheduler_config=_read_json(path / "scheduler" / "scheduler_config.json", "scheduler config"),
    )


@dataclass(slots=True)
class SourceModules:
    """The three PyTorch networks of a pipeline, in eval mode, fp32, on the CPU."""

    text_encoder: Any
    unet: Any
    vae: Any


def load_modules(info: SourceInfo) -> SourceModules:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    kwargs = {"torch_dtype": torch.float32}
    text_encoder = CLIPTextModel.from_pretrained(
        info.path / "text_encoder", attn_implementation="eager", **kwargs
    )
    unet = UNet2DConditionModel.from_pretrained(info.path / "unet", **kwargs)
    vae = AutoencoderKL.from_pretrained(info.path / "vae", **kwargs)
    return SourceModules(text_encoder=text_encoder.eval(), unet=unet.eval(), vae=vae.eval())
