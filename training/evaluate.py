"""Judge a diffusers text-to-image folder on the shapes grammar (``sfumato demo-model evaluate``).

Two prompt sets, each ``count`` prompts of random scenes, DDIM 25 steps, guidance 5: the exact
training template (``a {colour} {shape} on a {background} background``), and paraphrases in the
forms people type (:func:`sfumato.shapes.paraphrase`, a third of them without a background, when
any background is right). Each image's background colour, object colour (nearest palette colour)
and shape are read back by :func:`sfumato.shapes.judge` and compared with what its prompt asks;
both sets must meet :data:`QUALITY_BAR`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sfumato.shapes import Prompt, Score, canonical, paraphrase, random_scenes, score

QUALITY_BAR = {"background": 0.95, "colour": 0.90, "shape": 0.80}
NO_BACKGROUND_SHARE = 1 / 3


@dataclass(frozen=True, slots=True)
class PromptSetResult:
    score: Score
    prompts: list[Prompt]
    images: np.ndarray  # uint8 [N, H, W, 3]

    @property
    def passed(self) -> bool:
        return self.score.meets(**QUALITY_BAR)


@dataclass(frozen=True, slots=True)
class Evaluation:
    exact: PromptSetResult
    paraphrases: PromptSetResult

    @property
    def passed(self) -> bool:
        return self.exact.passed and self.paraphrases.passed

    @property
    def images(self) -> np.ndarray:
        return np.concatenate([self.exact.images, self.paraphrases.images])


def exact_prompts(count: int, *, seed: int) -> list[Prompt]:
    return [canonical(scene) for scene in random_scenes(count, seed=seed)]


def paraphrase_prompts(count: int, *, seed: int) -> list[Prompt]:
    """``count`` paraphrased prompts (other scenes than the exact set's), seeded."""
    rng = np.random.default_rng([seed, 2])
    scenes = random_scenes(count, seed=seed + 1)
    return [paraphrase(s, rng, background=rng.random() >= NO_BACKGROUND_SHARE) for s in scenes]


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
    results = []
    for prompts in (exact_prompts(count, seed=seed), paraphrase_prompts(count, seed=seed)):
        images = generate_with_diffusers(
            model_dir, [p.text for p in prompts], steps=steps, guidance=guidance, seed=seed
        )
        results.append(PromptSetResult(score=score(images, prompts), prompts=prompts, images=images))
    return Evaluation(exact=results[0], paraphrases=results[1])
