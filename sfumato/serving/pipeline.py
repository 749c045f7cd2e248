"""Everything between a prompt and pixels: tokenization, guidance, the scheduler loop,
img2img and inpainting, on numpy. The networks are plugged in (``Networks``); inside
Triton they are BLS calls to the four network models.

This follows diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline``
step for step, so given the same initial latents the images match (a test checks).

Randomness, documented so that any image can be regenerated alone: image ``i`` of a request
has seed ``seeds[i] = (seed + i) mod 2**63`` and its own ``numpy.random.Generator(PCG64(seed))``.
From it, in this order: the initial latent noise (``standard_normal``, float32, ``[C, h, w]``);
for img2img and inpainting, then the VAE posterior sample's noise; for ancestral schedulers,
then each step's noise. No other request's draws touch it, so results do not depend on what
else is in flight.

Progress: ``on_step`` is called after every denoising step with a :class:`Progress`; with
``preview_every = k`` every k-th step (but the last, which the images follow) also carries a
preview: the scheduler's current prediction of the clean latents (``pred_original_sample``,
blended with the known latents outside an inpainting mask) through the VAE decoder, at the
request's size. The decoder is exact for any exported model and already served and batched by
Triton; a latent-to-RGB linear map would be cheaper but is model-specific (SD 1.x's published
coefficients do not fit other VAEs). A preview draws no random numbers, so the images are the
same with or without previews.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from sfumato.serving.request import MAX_SEED, GenerationRequest
from sfumato.serving.schedulers import make_scheduler
from sfumato.serving.tokenizer import PromptTokenizer


class Networks(Protocol):
    """The four exported networks, batched along axis 0 (see ``sfumato.export.networks``)."""

    def text_encoder(self, input_ids: np.ndarray) -> np.ndarray: ...  # -> last_hidden_state

    def unet(
        self, sample: np.ndarray, timestep: np.ndarray, encoder_hidden_states: np.ndarray
    ) -> np.ndarray: ...

    def vae_encoder(self, image: np.ndarray) -> np.ndarray: ...  # -> latent_parameters

    def vae_decoder(self, latent: np.ndarray) -> np.ndarray: ...


class Cancelled(Exception):
    """The client gave up on the request; the loop stopped early."""


@dataclass(frozen=True, slots=True)
class PipelineSpec:
    """What the pipeline needs to know about the exported model (``pipeline.json``). The
    model's limits and defaults are in its ``config.pbtxt`` (``contract.model_limits``)."""

    scaling_factor: float
    latent_channels: int
    vae_scale_factor: int
    scheduler_config: dict
    model_name: str = ""

    @classmethod
    def load(cls, path: Path) -> PipelineSpec:
        data = json.loads(Path(path).read_text())
        return cls(
            scaling_factor=float(data["scaling_factor"]),
            latent_channels=int(data["latent_channels"]),
            vae_scale_factor=int(data["vae_scale_factor"]),
            scheduler_config=dict(data["scheduler_config"]),
            model_name=str(data.get("model_name", "")),
        )


@dataclass(frozen=True, slots=True)
class GenerationResult:
    images: np.ndarray  # uint8 [N, H, W, 3]
    seeds: np.ndarray  # int64 [N]


@dataclass(frozen=True, slots=True)
class Progress:
    """One denoising step done: ``step`` of ``total`` (img2img runs ``int(steps * strength)``)."""

    step: int
    total: int
    preview: np.ndarray | None = None  # uint8 [N, H, W, 3], on preview steps only


def preview_due(step: int, total: int, every: int) -> bool:
    """Whether step ``step`` (1-based) of ``total`` carries a preview: every ``every``-th, not the last."""
    return every > 0 and step % every == 0 and step < total


def image_seeds(seed: int | None, count: int) -> np.ndarray:
    base = secrets.randbelow(MAX_SEED + 1) if seed is None else int(seed)
    return np.asarray([(base + i) % (MAX_SEED + 1) for i in range(count)], dtype=np.int64)


def generators(seeds: np.ndarray) -> list[np.random.Generator]:
    return [np.random.Generator(np.random.PCG64(int(s))) for s in seeds]


def draw(gens: list[np.random.Generator], shape: tuple[int, ...]) -> np.ndarray:
    """One standard-normal float32 draw of ``shape`` per image, stacked: ``[N, *shape]``."""
    return np.stack([g.standard_normal(shape, dtype=np.float32) for g in gens])


def initial_noise(seeds: np.ndarray, *, channels: int, height: int, width: int) -> np.ndarray:
    """The initial latent noise of each image (before ``init_noise_sigma``), ``[N, C, h, w]``."""
    return draw(generators(seeds), (channels, height, width))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Decoder output ``[N, 3, H, W]`` in [-1, 1] -> ``uint8 [N, H, W, 3]`` (as diffusers' PIL path)."""
    pixels = np.clip(images.astype(np.float32) / 2.0 + 0.5, 0.0, 1.0)
    return np.rint(pixels.transpose(0, 2, 3, 1) * 255.0).astype(np.uint8)


def _latent_mask(mask: np.ndarray, *, height: int, width: int) -> np.ndarray:
    """``uint8 [H, W]`` (255 = repaint) -> ``float32 [1, 1, h, w]`` in [0, 1], area-averaged."""
    factor_h, factor_w = mask.shape[0] // height, mask.shape[1] // width
    m = mask.astype(np.float32).reshape(height, factor_h, width, factor_w).mean(axis=(1, 3)) / 255.0
    return m[None, None]


class DiffusionPipeline:
    def __init__(self, *, networks: Networks, tokenizer: PromptTokenizer, spec: PipelineSpec) -> None:
        self.networks = networks
        self.tokenizer = tokenizer
        self.spec = spec

    @classmethod
    def from_assets(cls, assets: Path, *, networks: Networks) -> DiffusionPipeline:
        """Load ``pipeline.json`` and ``tokenizer.json`` from an exported ``pipeline/1/assets``."""
        assets = Path(assets)
        return cls(
            networks=networks,
            tokenizer=PromptTokenizer(assets / "tokenizer.json"),
            spec=PipelineSpec.load(assets / "pipeline.json"),
        )

    def encode_prompt(self, request: GenerationRequest, *, guided: bool) -> np.ndarray:
        """UNet context rows: ``[uncond x N, cond x N]`` with guidance, else ``[cond x N]``."""
        prompts = [request.negative_prompt, request.prompt] if guided else [request.prompt]
        hidden = self.networks.text_encoder(self.tokenizer(prompts))
        n = request.num_images
        return np.repeat(hidden, n, axis=0)

    def __call__(
        self,
        request: GenerationRequest,
        *,
        latents: np.ndarray | None = None,
        cancelled: Callable[[], bool] = lambda: False,
        on_step: Callable[[Progress], None] | None = None,
        preview_every: int = 0,
    ) -> GenerationResult:
        """Run one request. ``latents`` overrides the seeded initial noise (txt2img; for parity
        tests). ``cancelled`` is asked before each step; ``on_step`` hears of each step done."""
        spec = self.spec
        n = request.num_images
        h, w = request.height // spec.vae_scale_factor, request.width // spec.vae_scale_factor
        seeds = image_seeds(request.seed, n)
        gens = generators(seeds)
        guided = request.guidance_scale > 1.0
        context = self.encode_prompt(request, guided=guided)

        scheduler = make_scheduler(request.scheduler, spec.scheduler_config)
        scheduler.set_timesteps(request.steps)
        timesteps = scheduler.timesteps
        noise = draw(gens, (spec.latent_channels, h, w))
        if latents is not None:
            noise = np.asarray(latents, dtype=np.float32).reshape(noise.shape)

        known: np.ndarray | None = None
        latent_mask: np.ndarray | None = None
        if request.image is None:
            sample = noise * np.float32(scheduler.init_noise_sigma)
        else:
            image = request.image.astype(np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0
            parameters = self.networks.vae_encoder(image)
            mean, logvar = np.split(parameters.astype(np.float32), 2, axis=1)
            std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
            known = (mean + std * draw(gens, mean.shape[1:])) * np.float32(spec.scaling_factor)
            init_steps = min(int(request.steps * request.strength), request.steps)
            start = max(request.steps - init_steps, 0) * scheduler.order
            timesteps = timesteps[start:]
            scheduler.set_begin_index(start)
            sample = scheduler.add_noise(known, noise, np.repeat(timesteps[:1], n))
            if request.mask is not None:
                latent_mask = _latent_mask(request.mask, height=h, width=w)

        for i, t in enumerate(timesteps):
            if cancelled():
                raise Cancelled(f"request cancelled by the client after step {i} of {len(timesteps)}")
            model_in = np.concatenate([sample, sample]) if guided else sample
            model_in = scheduler.scale_model_input(model_in, t).astype(np.float32)
            t_rows = np.full((model_in.shape[0],), t, dtype=np.float32)
            prediction = self.networks.unet(model_in, t_rows, context)
            if guided:
                uncond, cond = np.split(prediction, 2)
                prediction = uncond + np.float32(request.guidance_scale) * (cond - uncond)
            step_noise = draw(gens, sample.shape[1:]) if request.scheduler == "euler_a" else None
            sample = scheduler.step(prediction, t, sample, noise=step_noise)
            if latent_mask is not None and known is not None:
                # Legacy inpainting for UNets without mask channels: outside the mask, put back
                # the source latents noised to the level of the next step (clean after the last).
                if i + 1 < len(timesteps):
                    background = scheduler.add_noise(known, noise, np.repeat(timesteps[i + 1 : i + 2], n))
                else:
                    background = known
                sample = background * (1.0 - latent_mask) + sample * latent_mask
            if on_step is not None:
                preview = None
                if preview_due(i + 1, len(timesteps), preview_every):
                    estimate = scheduler.pred_original_sample
                    if latent_mask is not None and known is not None:
                        estimate = known * (1.0 - latent_mask) + estimate * latent_mask
                    preview = self.decode(estimate)
                on_step(Progress(step=i + 1, total=len(timesteps), preview=preview))

        return GenerationResult(images=self.decode(sample), seeds=seeds)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents ``[N, C, h, w]`` -> ``uint8 [N, H, W, 3]`` through the VAE decoder."""
        scaled = (latents / np.float32(self.spec.scaling_factor)).astype(np.float32)
        return to_uint8(self.networks.vae_decoder(scaled))
