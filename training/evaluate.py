"""Judge a diffusers text-to-image folder on the shapes grammar (``sfumato demo-model evaluate``).

48 random prompts of the data set's grammar, DDIM 25 steps, guidance 5: each image's
background colour, object colour (nearest palette colour) and shape are read back by
:func:`sfumato.shapes.judge` and compared with the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sfumato.shapes import Scene, Score, random_scenes, score

QUALITY_BAR = {"background": 0.95, "colour": 0.90, "shape": 0.80}


@dataclass(frozen=True, slots=True)
class Evaluation:
    score: Score
    scenes: list[Scene]
    images: np.ndarray  # uint8 [N, H, W, 3]

    @property
    def passed(self) -> bool:
        return self.score.meets(**QUALITY_BAR)


def generate_with_diffusers(
    model_dir: Path, prompts: list[str], *, steps: int, guidance: float, seed: int
) -> np.ndarray:
    """Images from ``StableDiffusionPipeline`` in-process, one seeded generator for the batch."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        out = pipe(
            prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="np"
        )
    return np.clip(np.rint(out.images * 255.0), 0, 255).astype(np.uint8)


def evaluate_demo_model(
    model_dir: Path, *, count: int = 48, steps: int = 25, guidance: float = 5.0, seed: int = 0
) -> Evaluation:
    scenes = random_scenes(count, seed=seed)
    images = generate_with_diffusers(
        model_dir, [s.caption for s in scenes], steps=steps, guidance=guidance, seed=seed
    )
    return Evaluation(score=score(images, scenes), scenes=scenes, images=images)
