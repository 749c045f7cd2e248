"""Fine-tune a diffusers Stable Diffusion folder on a user's data set: LoRA or full.

The same noise-prediction objective as the demo model's own training (:mod:`.train`): latents
encoded once by the pipeline's VAE (posterior mean and std kept, a fresh sample per step), a
random timestep per image, epsilon MSE, AdamW with warmup and cosine decay, gradient clipping,
10% empty captions so classifier-free guidance keeps working.

* ``lora``: peft LoRA adapters on the UNet's attention projections (``to_q``, ``to_k``,
  ``to_v``, ``to_out.0``) and the text encoder's (``q_proj``, ``k_proj``, ``v_proj``,
  ``out_proj``); everything else frozen. The weights are saved in the diffusers LoRA format
  (``pytorch_lora_weights.safetensors``, what ``pipe.load_lora_weights`` reads) and fused into
  the base for serving (``load_lora_weights`` + ``fuse_lora``).
* ``full``: every UNet weight, plus the text encoder's token embeddings of the words that the
  captions use (a word the base never saw, ``pink``, has an untrained embedding of its own; the
  rest of the text encoder stays frozen so that the words it knows keep their meaning).

Durable: every ``checkpoint_every`` steps the trainable weights, the optimizer, the schedule, the
random states and the loss history go to one file (``on_checkpoint`` stores it); a run given that
file resumes at the next step with the same loss curve as if it had never stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True, slots=True)
class FinetunePlan:
    method: Literal["lora", "full"] = "lora"
    steps: int = 500
    learning_rate: float = 1e-4
    batch_size: int = 1
    rank: int = 4
    seed: int = 0
    resolution: int | None = None  # default: the base UNet's sample size x the VAE's scale
    warmup_steps: int = 20
    empty_caption_rate: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    log_every: int = 5
    threads: int = 2
    min_step_s: float = 0.0  # each step takes at least this long (a CPU budget on a shared machine)


@dataclass
class Progress:
    """Where a run stands; ``history`` is (step, loss) every ``log_every`` steps (1-based steps)."""

    step: int
    total: int
    loss: float | None
    elapsed_s: float
    history: list[tuple[int, float]] = field(default_factory=list)

    @property
    def eta_s(self) -> float | None:
        if self.step <= 0 or self.elapsed_s <= 0:
            return None
        return self.elapsed_s / self.step * (self.total - self.step)


@dataclass
class FinetuneResult:
    pipeline: Any  # the StableDiffusionPipeline with the trained weights (LoRA not yet fused)
    progress: Progress
    resumed_from: int  # the checkpoint's step (0: a fresh start)
    steps_per_s: float  # over the steps this run did itself
    plan: FinetunePlan


def load_examples(folder: Path) -> tuple[list[Path], list[str]]:
    """A checked data set folder (``metadata.jsonl`` + images): image paths and captions."""
    import json

    folder = Path(folder)
    paths, captions = [], []
    for line in (folder / "metadata.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        paths.append(folder / entry["file_name"])
        captions.append(entry["text"])
    return paths, captions


def _pixels(paths: list[Path], resolution: int) -> torch.Tensor:
    from PIL import Image

    arrays = []
    for path in paths:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            if rgb.size != (resolution, resolution):
                rgb = rgb.resize((resolution, resolution), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(rgb, dtype=np.uint8))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return batch.div(127.5).sub(1.0).contiguous()


def _lr_lambda(*, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _embedding_rows(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    """Token ids of the words the captions use (not the special tokens)."""
    ids = set()
    for ids_row in tokenizer(captions, add_special_tokens=False).input_ids:
        ids.update(ids_row)
    return torch.tensor(sorted(ids), dtype=torch.long)


def finetune(
    base_dir: Path,
    data_dir: Path,
    *,
    plan: FinetunePlan,
    checkpoint: Path | None = None,
    on_step: Callable[[Progress], None] | None = None,
    on_checkpoint: Callable[[Path, Progress], None] | None = None,
    work_dir: Path,
) -> FinetuneResult:
    """Train ``plan.steps`` steps on the data set in ``data_dir`` from the pipeline in
    ``base_dir``, resuming from ``checkpoint`` when given. ``on_step`` is called after every step;
    ``on_checkpoint(path, progress)`` after each checkpoint file is written in ``work_dir``."""
    with torch.enable_grad():
        return _finetune(
            Path(base_dir),
            Path(data_dir),
            plan=plan,
            checkpoint=checkpoint,
            on_step=on_step,
            on_checkpoint=on_checkpoint,
            work_dir=Path(work_dir),
        )


def _finetune(
    base_dir: Path,
    data_dir: Path,
    *,
    plan: FinetunePlan,
    checkpoint: Path | None,
    on_step: Callable[[Progress], None] | None,
    on_checkpoint: Callable[[Path, Progress], None] | None,
    work_dir: Path,
) -> FinetuneResult:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    torch.set_num_threads(plan.threads)
    torch.manual_seed(plan.seed)
    pipe = StableDiffusionPipeline.from_pretrained(str(base_dir), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    unet, text_encoder, vae, tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = plan.resolution or unet.config.sample_size * scale

    paths, captions = load_examples(data_dir)
    images = _pixels(paths, resolution)
    with torch.no_grad():
        means, stds = [], []
        for chunk in images.split(256):
            dist = vae.encode(chunk).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    latent_mean, latent_std = torch.cat(means), torch.cat(stds)
    factor = float(vae.config.scaling_factor)

    def encode(texts: list[str]) -> torch.Tensor:
        return tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    token_ids, empty_ids = encode(captions), encode([""])[0]

    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    embedding = text_encoder.get_input_embeddings()
    rows = torch.empty(0, dtype=torch.long)
    if plan.method == "lora":
        from peft import LoraConfig

        unet.add_adapter(
            LoraConfig(
                r=plan.rank,
                lora_alpha=plan.rank,
                init_lora_weights="gaussian",
                target_modules=list(UNET_LORA_TARGETS),
            )
        )
        text_encoder.add_adapter(
            LoraConfig(
                r=plan.rank,
                lora_alpha=plan.rank,
                init_lora_weights="gaussian",
                target_modules=list(TEXT_LORA_TARGETS),
            )
        )
        params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    else:
        unet.requires_grad_(True)
        embedding.weight.requires_grad_(True)
        rows = _embedding_rows(tokenizer, captions)
        keep = torch.ones(embedding.weight.shape[0], 1)
        keep[rows] = 0.0
        frozen = keep.bool().squeeze(1)
        # Only the captions' words learn: the other rows' gradient is zeroed (AdamW's weight
        # decay is off for the table, so they stay exactly as they were).
        embedding.weight.register_hook(lambda grad: grad.masked_fill(frozen[:, None], 0.0))
        params = [*unet.parameters(), embedding.weight]
    groups = [{"params": [p for p in params if p is not embedding.weight], "weight_decay": 0.01}]
    if plan.method == "full":
        groups.append({"params": [embedding.weight], "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=plan.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(warmup=min(plan.warmup_steps, plan.steps), total=plan.steps)
    )
    noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    rng = np.random.default_rng(plan.seed)
    generator = torch.Generator().manual_seed(plan.seed)
    progress = Progress(step=0, total=plan.steps, loss=None, elapsed_s=0.0)
    resumed_from = 0
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        trainable = {n: p for n, p in _named_trainable(unet, text_encoder, plan.method)}
        for name, value in state["weights"].items():
            trainable[name].data.copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        rng.bit_generator.state = state["numpy_rng"]
        generator.set_state(state["torch_rng"])
        progress = Progress(
            step=state["step"],
            total=plan.steps,
            loss=state["history"][-1][1] if state["history"] else None,
            elapsed_s=state["elapsed_s"],
            history=[tuple(h) for h in state["history"]],
        )
        resumed_from = state["step"]

    unet.train()
    text_encoder.train()
    started = time.perf_counter()
    base_elapsed = progress.elapsed_s
    recent: list[float] = []
    for step in range(progress.step + 1, plan.steps + 1):
        step_started = time.perf_counter()
        idx = torch.from_numpy(rng.integers(0, len(latent_mean), size=plan.batch_size))
        eps = torch.randn(latent_mean[idx].shape, generator=generator)
        latents = (latent_mean[idx] + latent_std[idx] * eps) * factor
        ids = token_ids[idx].clone()
        drop = torch.from_numpy(rng.random(len(idx)) < plan.empty_caption_rate)
        ids[drop] = empty_ids
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.from_numpy(
            rng.integers(0, noise_schedule.config.num_train_timesteps, size=len(idx))
        )
        noisy = noise_schedule.add_noise(latents, noise, timesteps)
        context = text_encoder(ids).last_hidden_state
        prediction = unet(noisy, timesteps, context).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, plan.grad_clip)
        optimizer.step()
        schedule.step()
        recent = [*recent[-19:], loss.item()]
        if plan.min_step_s:
            time.sleep(max(0.0, plan.min_step_s - (time.perf_counter() - step_started)))
        progress.step = step
        progress.loss = float(np.mean(recent))
        progress.elapsed_s = base_elapsed + time.perf_counter() - started
        if step % plan.log_every == 0 or step == plan.steps:
            progress.history.append((step, round(progress.loss, 6)))
        if on_step is not None:
            on_step(progress)
        if on_checkpoint is not None and (step % plan.checkpoint_every == 0 and step < plan.steps):
            path = work_dir / "checkpoint.pt"
            torch.save(
                {
                    "step": step,
                    "plan": asdict(plan),
                    "weights": {
                        n: p.detach().clone() for n, p in _named_trainable(unet, text_encoder, plan.method)
                    },
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "numpy_rng": rng.bit_generator.state,
                    "torch_rng": generator.get_state(),
                    "history": progress.history,
                    "elapsed_s": progress.elapsed_s,
                },
                path,
            )
            on_checkpoint(path, progress)
    done = progress.step - resumed_from
    run_s = time.perf_counter() - started
    unet.eval()
    text_encoder.eval()
    return FinetuneResult(
        pipeline=pipe,
        progress=progress,
        resumed_from=resumed_from,
        steps_per_s=done / run_s if run_s > 0 else 0.0,
        plan=plan,
    )


def _named_trainable(unet: Any, text_encoder: Any, method: str) -> list[tuple[str, torch.nn.Parameter]]:
    named = [(f"unet.{n}", p) for n, p in unet.named_parameters() if p.requires_grad]
    named += [(f"text_encoder.{n}", p) for n, p in text_encoder.named_parameters() if p.requires_grad]
    return named


def save_lora(result: FinetuneResult, out_dir: Path) -> Path:
    """The LoRA adapters as one diffusers LoRA file (``out_dir/pytorch_lora_weights.safetensors``)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    pipe = result.pipeline
    StableDiffusionPipeline.save_lora_weights(
        str(out_dir),
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        safe_serialization=True,
    )
    return Path(out_dir) / LORA_FILE


def save_pipeline(result: FinetuneResult, out_dir: Path, *, base_dir: Path, lora_dir: Path | None) -> Path:
    """A plain diffusers pipeline folder with the trained weights in it: for ``lora`` the base
    reloaded with the LoRA file and fused (what a user of the file would do), for ``full`` the
    trained pipeline as it is."""
    from diffusers import StableDiffusionPipeline

    if result.plan.method == "lora":
        if lora_dir is None:
            raise ValueError("a LoRA result needs the folder of its LoRA file")
        pipe = StableDiffusionPipeline.from_pretrained(str(base_dir), torch_dtype=torch.float32)
        pipe.load_lora_weights(str(lora_dir), weight_name=LORA_FILE)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    else:
        pipe = result.pipeline
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    # The tokenizer's CLIP files, as the base ships them (older readers want vocab.json + merges.txt).
    import shutil

    for name in ("vocab.json", "merges.txt"):
        source = Path(base_dir) / "tokenizer" / name
        if source.is_file():
            shutil.copy(source, Path(out_dir) / "tokenizer" / name)
    return Path(out_dir)


def render(
    pipeline_dir: Path, prompts: list[str], *, seed: int, steps: int = 25, guidance: float = 5.0
) -> np.ndarray:
    """Validation images of ``prompts`` from a pipeline folder, in-process (uint8 [N, H, W, 3])."""
    from sfumato.training.evaluate import generate_with_diffusers

    return generate_with_diffusers(pipeline_dir, prompts, steps=steps, guidance=guidance, seed=seed)
