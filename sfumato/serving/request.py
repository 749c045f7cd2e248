"""A generation request: its fields, their defaults and their validation.

The Triton ``pipeline`` model, the in-process ONNX Runtime pipeline and (later) the control
plane share this one definition, so a bad field is reported with the same message wherever it
enters. Every error names the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sfumato.serving.schedulers import SCHEDULERS

MAX_SEED = 2**63 - 1


class InvalidRequest(ValueError):
    """A request field is missing or out of range; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class Limits:
    """What one served model accepts; written by ``sfumato export`` into the pipeline config."""

    min_size: int
    max_size: int
    size_multiple: int = 8
    max_steps: int = 150
    max_images: int = 8
    max_guidance: float = 50.0
    max_prompt_chars: int = 2000


@dataclass(frozen=True, slots=True)
class Defaults:
    width: int
    height: int
    steps: int = 25
    guidance_scale: float = 7.5
    scheduler: str = "ddim"
    img2img_strength: float = 0.8
    inpaint_strength: float = 1.0


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A validated request. ``image`` is ``uint8 [H, W, 3]``, ``mask`` ``uint8 [H, W]`` (255 = repaint)."""

    prompt: str
    negative_prompt: str = ""
    num_images: int = 1
    steps: int = 25
    guidance_scale: float = 7.5
    seed: int | None = None
    width: int = 512
    height: int = 512
    scheduler: str = "ddim"
    image: np.ndarray | None = None
    mask: np.ndarray | None = None
    strength: float = 1.0

    @property
    def mode(self) -> str:
        if self.mask is not None:
            return "inpaint"
        return "img2img" if self.image is not None else "txt2img"


def _check_size(field: str, value: int, limits: Limits) -> None:
    if value % limits.size_multiple:
        raise InvalidRequest(field, f"{value} is not a multiple of {limits.size_multiple}")
    if not limits.min_size <= value <= limits.max_size:
        raise InvalidRequest(
            field, f"{value} is outside this model's range {limits.min_size}..{limits.max_size}"
        )


def build_request(
    *,
    limits: Limits,
    defaults: Defaults,
    prompt: str | None,
    negative_prompt: str | None = None,
    num_images: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int | None = None,
    width: int | None = None,
    height: int | None = None,
    scheduler: str | None = None,
    image: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    strength: float | None = None,
) -> GenerationRequest:
    """Apply defaults and validate; raises :class:`InvalidRequest` naming the first bad field."""
    if prompt is None or not prompt.strip():
        raise InvalidRequest("prompt", "must not be empty")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidRequest("prompt", f"longer than {limits.max_prompt_chars} characters")
    negative_prompt = negative_prompt or ""
    if len(negative_prompt) > limits.max_prompt_chars:
        raise InvalidRequest("negative_prompt", f"longer than {limits.max_prompt_chars} characters")
    num_images = 1 if num_images is None else int(num_images)
    if not 1 <= num_images <= limits.max_images:
        raise InvalidRequest("num_images", f"{num_images} is outside 1..{limits.max_images}")
    steps = defaults.steps if steps is None else int(steps)
    if not 1 <= steps <= limits.max_steps:
        raise InvalidRequest("steps", f"{steps} is outside 1..{limits.max_steps}")
    guidance_scale = defaults.guidance_scale if guidance_scale is None else float(guidance_scale)
    if not (math.isfinite(guidance_scale) and 0.0 <= guidance_scale <= limits.max_guidance):
        raise InvalidRequest("guidance_scale", f"{guidance_scale} is outside 0..{limits.max_guidance}")
    if seed is not None and not 0 <= int(seed) <= MAX_SEED:
        raise InvalidRequest("seed", f"{seed} is outside 0..{MAX_SEED}")
    scheduler = (scheduler or defaults.scheduler).strip().lower()
    if scheduler not in SCHEDULERS:
        raise InvalidRequest(
            "scheduler", f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}"
        )

    if image is not None:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InvalidRequest("image", f"must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
        img_h, img_w = image.shape[:2]
        if width is not None and int(width) != img_w:
            raise InvalidRequest("width", f"{width} does not match the image width {img_w}")
        if height is not None and int(height) != img_h:
            raise InvalidRequest("height", f"{height} does not match the image height {img_h}")
        width, height = img_w, img_h
    width = defaults.width if width is None else int(width)
    height = defaults.height if height is None else int(height)
    _check_size("width", width, limits)
    _check_size("height", height, limits)

    if mask is not None:
        if image is None:
            raise InvalidRequest("mask", "needs an image to inpaint")
        mask = np.asarray(mask)
        if mask.ndim == 3 and mask.shape[2] == 1:
            mask = mask[:, :, 0]
        if mask.dtype != np.uint8 or mask.ndim != 2:
            raise InvalidRequest("mask", f"must be uint8 [H, W], got {mask.dtype} {list(mask.shape)}")
        if mask.shape != image.shape[:2]:
            raise InvalidRequest(
                "mask", f"shape {list(mask.shape)} does not match the image's {list(image.shape[:2])}"
            )
    if strength is not None and image is None:
        raise InvalidRequest("strength", "only applies with an image (img2img or inpainting)")
    if strength is None:
        strength = defaults.inpaint_strength if mask is not None else defaults.img2img_strength
    strength = float(strength)
    if not (math.isfinite(strength) and 0.0 < strength <= 1.0):
        raise InvalidRequest("strength", f"{strength} is outside (0, 1]")
    if image is not None and int(steps * strength) < 1:
        raise InvalidRequest("strength", f"{strength} with {steps} steps leaves no denoising step")
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        num_images=num_images,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=None if seed is None else int(seed),
        width=width,
        height=height,
        scheduler=scheduler,
        image=image,
        mask=mask,
        strength=strength if image is not None else 1.0,
    )
