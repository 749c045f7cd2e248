"""A validated generation request, as the pipeline runs it.

The fields, their bounds, defaults and checks are declared once in
:mod:`sfumato.serving.contract`; :func:`build_request` applies them (through
:func:`~sfumato.serving.contract.check_request`) and returns the typed request. A bad field is
reported with the same message wherever it enters (REST, the pipeline models). Every error
names the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sfumato.serving.contract import MAX_SEED, Defaults, InvalidRequest, Limits, check_request

__all__ = ["MAX_SEED", "Defaults", "GenerationRequest", "InvalidRequest", "Limits", "build_request"]


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


def build_request(*, limits: Limits, defaults: Defaults, **fields: Any) -> GenerationRequest:
    """Apply the model's defaults and validate; raises :class:`InvalidRequest` naming the first
    bad field (a missing ``prompt`` included). ``fields`` are the contract's generation fields."""
    return GenerationRequest(**check_request(fields, limits=limits, defaults=defaults))
