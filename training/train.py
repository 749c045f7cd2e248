"""Train the demo model from scratch on the shapes data set and save a diffusers folder.

Two phases, as Stable Diffusion was built: first the autoencoder (reconstruction + a small KL
term), then the UNet and the text encoder together on the autoencoder's latents, with 10% empty
captions so classifier-free guidance works and an EMA of the weights for sampling.

What made this fast and stable on a 2-core CPU: the data set is rendered once into an array,
latents are encoded once (mean and std kept, a fresh sample drawn per step), AdamW with warmup
and cosine decay around 1e-3, gradient clipping, and the EMA.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sfumato.shapes import make_dataset
from sfumato.training import architecture
from sfumato.training.tokenizer import MODEL_MAX_LENGTH, train_tokenizer


@dataclass(frozen=True, slots=True)
class TrainingPlan:
    """Every knob of a training run; the defaults are what the committed model was trained with."""

    seed: int = 0
    dataset_size: int = 20_000
    paraphrase_rate: float = 0.65  # captions in the forms people type (the rest: the exact template)
    no_background_rate: float = 0.2  # of the paraphrases, those that leave the background out
    vae_steps: int = 1_200
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 4_000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup_steps: int = 100
    empty_caption_rate: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    threads: int = 2


def _lr_lambda(*, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _batches(rng: np.random.Generator, *, size: int, batch: int) -> Iterator[np.ndarray]:
    while True:
        yield rng.integers(0, size, size=batch)


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, *, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)


class _Log:
    """Loss log: one CSV row per logged step, plus a tqdm bar on the terminal."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(["phase", "step", "loss", "lr", "elapsed_s"])
        self._start = time.perf_counter()

    def row(self, phase: str, step: int, loss: float, lr: float) -> None:
        elapsed = time.perf_counter() - self._start
        self._writer.writerow([phase, step, f"{loss:.6f}", f"{lr:.6g}", f"{elapsed:.1f}"])
        self._file.flush()  # the log is how a long run is followed while it runs

    def close(self) -> None:
        self._file.close()


def train_vae(
    images: torch.Tensor, *, plan: TrainingPlan, log: _Log, progress: bool
) -> tuple[torch.nn.Module, float]:
    """Train the autoencoder; returns it and the final mean reconstruction MSE (in [-1, 1] units)."""
    vae = architecture.build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=plan.vae_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(warmup=plan.warmup_steps, total=plan.vae_steps)
    )
    rng = np.random.default_rng(plan.seed + 1)
    batches = _batches(rng, size=len(images), batch=plan.vae_batch)
    vae.train()
    recent: list[float] = []
    bar = tqdm(range(plan.vae_steps), desc="vae", disable=not progress, dynamic_ncols=True)
    for step in bar:
        x = images[next(batches)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        loss = mse + plan.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), plan.grad_clip)
        optimizer.step()
        schedule.step()
        recent = [*recent[-49:], mse.item()]
        if step % 10 == 0 or step == plan.vae_steps - 1:
            log.row("vae", step, mse.item(), schedule.get_last_lr()[0])
            bar.set_postfix(mse=f"{np.mean(recent):.4f}")
    vae.eval()
    return vae, float(np.mean(recent))


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Posterior mean and std of every image, once; plus the latent scaling factor (1/std)."""
    means, stds = [], []
    for chunk in images.split(512):
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    generator = torch.Generator().manual_seed(0)
    sample = mean + std * torch.randn(mean.shape, generator=generator)
    return mean, std, float(1.0 / sample.std())


def train_unet(
    *,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    scaling_factor: float,
    token_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    text_encoder: torch.nn.Module,
    plan: TrainingPlan,
    log: _Log,
    progress: bool,
) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    """Train UNet and text encoder jointly (epsilon prediction); returns their EMA copies."""
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler(
        **{
            k: v
            for k, v in architecture.scheduler_config().items()
            if k not in {"set_alpha_to_one", "steps_offset"}
        }
    )
    unet = architecture.build_unet()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=plan.unet_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(warmup=plan.warmup_steps, total=plan.unet_steps)
    )
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    for module in (ema_unet, ema_text):
        module.requires_grad_(False)
    rng = np.random.default_rng(plan.seed + 2)
    batches = _batches(rng, size=len(latent_mean), batch=plan.unet_batch)
    unet.train()
    text_encoder.train()
    recent: list[float] = []
    bar = tqdm(range(plan.unet_steps), desc="unet", disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = torch.from_numpy(next(batches))
        latents = (latent_mean[idx] + latent_std[idx] * torch.randn_like(latent_mean[idx])) * scaling_factor
        ids = token_ids[idx].clone()
        drop = torch.from_numpy(rng.random(len(idx)) < plan.empty_caption_rate)
        ids[drop] = empty_ids
        noise = torch.randn_like(latents)
        timesteps = torch.from_numpy(rng.integers(0, 1000, size=len(idx)))
        noisy = noise_schedule.add_noise(latents, noise, timesteps)
        context = text_encoder(ids).last_hidden_state
        prediction = unet(noisy, timesteps, context).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, plan.grad_clip)
        optimizer.step()
        schedule.step()
        decay = min(plan.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay=decay)
        _ema_update(ema_text, text_encoder, decay=decay)
        recent = [*recent[-99:], loss.item()]
        if step % 10 == 0 or step == plan.unet_steps - 1:
            log.row("unet", step, loss.item(), schedule.get_last_lr()[0])
            bar.set_postfix(loss=f"{np.mean(recent):.4f}")
    return ema_unet, ema_text, float(np.mean(recent))


def _make_readable(root: Path) -> None:
    """``mkdtemp`` makes a private folder; the model folder is meant to be shared."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def train_demo_model(out_dir: Path, *, plan: TrainingPlan | None = None, progress: bool = True) -> dict:
    """Train everything and write a ``StableDiffusionPipeline`` folder at ``out_dir``.

    The folder is assembled in a temporary directory beside ``out_dir`` and renamed into place,
    so an interrupted run never leaves a half-written model. Returns the training report, which
    is also saved as ``training_report.json`` in the folder (the loss log as ``training_log.csv``).
    """

    plan = plan or TrainingPlan()
    with torch.enable_grad():  # whatever grad mode the caller left on
        return _train(out_dir, plan=plan, progress=progress)


def _train(out_dir: Path, *, plan: TrainingPlan, progress: bool) -> dict:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    torch.manual_seed(plan.seed)
    torch.set_num_threads(plan.threads)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    started = time.perf_counter()
    try:
        log = _Log(staging / "training_log.csv")
        pixels, captions = make_dataset(
            plan.dataset_size,
            seed=plan.seed,
            paraphrase_rate=plan.paraphrase_rate,
            no_background_rate=plan.no_background_rate,
        )
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()

        vae, vae_mse = train_vae(images, plan=plan, log=log, progress=progress)
        vae_done = time.perf_counter()
        latent_mean, latent_std, scaling_factor = encode_latents(vae, images)
        vae.register_to_config(scaling_factor=scaling_factor)

        token_dir = train_tokenizer(staging / "_tokenizer")
        tokenizer = CLIPTokenizer(
            str(token_dir / "vocab.json"), str(token_dir / "merges.txt"), model_max_length=MODEL_MAX_LENGTH
        )

        def encode(texts: list[str]) -> torch.Tensor:
            return tokenizer(
                texts, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True, return_tensors="pt"
            ).input_ids

        token_ids, empty_ids = encode(captions), encode([""])[0]
        text_encoder = architecture.build_text_encoder(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            max_length=MODEL_MAX_LENGTH,
        )
        unet, text_encoder, unet_loss = train_unet(
            latent_mean=latent_mean,
            latent_std=latent_std,
            scaling_factor=scaling_factor,
            token_ids=token_ids,
            empty_ids=empty_ids,
            text_encoder=text_encoder,
            plan=plan,
            log=log,
            progress=progress,
        )
        log.close()
        pipeline = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=DDIMScheduler(**architecture.scheduler_config()),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.save_pretrained(staging, safe_serialization=True)
        # transformers writes tokenizer.json; keep CLIP's vocab.json + merges.txt beside it too,
        # which older transformers and other CLIP tokenizers read.
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(token_dir / name, staging / "tokenizer" / name)
        shutil.rmtree(token_dir)
        finished = time.perf_counter()
        report = {
            "plan": asdict(plan),
            "vae_seconds": round(vae_done - started, 1),
            "unet_seconds": round(finished - vae_done, 1),
            "total_seconds": round(finished - started, 1),
            "vae_reconstruction_mse": round(vae_mse, 5),
            "unet_final_loss": round(unet_loss, 5),
            "latent_scaling_factor": scaling_factor,
            "torch": torch.__version__,
        }
        (staging / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
        _make_readable(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
        return report
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
