"""``sfumato training run --id ID``: run one training record end to end.

What the executor starts (a local guarded process, or a Kubernetes Job's container). It reads the
record and its data set from the control plane's database and object store (the same
``SFUMATO_*`` settings), trains (:func:`sfumato.training.finetune.finetune`), and while it runs
writes its step, loss and ETA to the record (``details``), and every
``SFUMATO_TRAINING_CHECKPOINT_EVERY`` steps a checkpoint to the store
(``trainings/<id>/checkpoint.pt``), from which a later attempt resumes. At the end:

1. LoRA: the adapters as a diffusers LoRA file (``trainings/<id>/weights/...safetensors``,
   served by ``GET /v1/trainings/{id}/weights``), fused into the base; full: the trained weights;
2. the result as a diffusers pipeline folder (``trainings/<id>/pipeline/``);
3. the validation prompts rendered in-process (``trainings/<id>/validation/<n>.png``);
4. the hand-off to the model registry: ``sfumato.export.versions.export_version`` writes the new
   Triton version (with the exporter's parity checks) and
   ``sfumato.control_plane.registry.publish_version`` loads it in Triton, runs the validation
   prompts through it and records the lineage; ``output`` (``model``, ``version``) goes on the record.

The runner holds the lease and decides the final status from this process's exit code; this
process only reports. A report that finds the training no longer running (canceled, deleted)
stops it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("sfumato.training")
REPORT_EVERY_S = 1.0


class Stopped(Exception):
    """The record says the training is no longer running: stop."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while piece := handle.read(2**20):
            digest.update(piece)
    return digest.hexdigest()


async def run_training(training_id: str) -> dict[str, Any]:
    from sfumato.control_plane.services import Services
    from sfumato.control_plane.settings import get_settings

    services = Services.build(get_settings())
    try:
        return await _run(services, training_id)
    finally:
        await services.close()


async def _run(services: Any, training_id: str) -> dict[str, Any]:
    import torch

    from sfumato.control_plane import trainings
    from sfumato.control_plane.storage import get_tree, put_tree
    from sfumato.training.finetune import FinetunePlan, Progress, finetune, save_lora, save_pipeline

    settings, store = services.settings, services.store
    torch.set_num_threads(settings.training_threads)

    async def db(operation, /, **kwargs):  # type: ignore[no-untyped-def]
        async with services.sessions() as session:
            return await operation(session=session, **kwargs)

    job = await db(trainings.load_training, training_id=training_id)
    params = dict(job.params)
    work = Path(tempfile.mkdtemp(prefix=f"sfumato-training-{training_id}-"))
    loop = asyncio.get_running_loop()
    try:
        data_dir = work / "data"
        await get_tree(store, params["dataset_prefix"], data_dir)
        checkpoint = None
        if await store.exists(trainings.checkpoint_key(training_id)):
            checkpoint = work / "resume.pt"
            await store.get_file(trainings.checkpoint_key(training_id), checkpoint)
        plan = FinetunePlan(
            method=params["method"],
            steps=params["steps"],
            learning_rate=params["learning_rate"],
            batch_size=params["batch_size"],
            rank=params.get("rank") or 4,
            seed=params["seed"],
            resolution=params.get("resolution"),
            checkpoint_every=settings.training_checkpoint_every,
            threads=settings.training_threads,
            min_step_s=settings.training_min_step_s,
        )
        base_dir = Path(settings.training_base_dir)
        if params.get("base_pipeline_prefix"):  # a model a training made: its stored pipeline
            base_dir = work / "base"
            await get_tree(store, params["base_pipeline_prefix"], base_dir)
        last_report = [0.0]
        pending: list[Any] = []

        def details_of(progress: Progress) -> dict[str, Any]:
            return {
                "step": progress.step,
                "total": progress.total,
                "loss": round(progress.loss, 6) if progress.loss is not None else None,
                "eta_s": round(progress.eta_s, 1) if progress.eta_s is not None else None,
                "elapsed_s": round(progress.elapsed_s, 1),
                "history": progress.history,
            }

        def send(details: dict[str, Any], fraction: float) -> Any:
            return asyncio.run_coroutine_threadsafe(
                db(trainings.report, training_id=training_id, details=details, progress=fraction), loop
            )

        def on_step(progress: Progress) -> None:
            if pending and pending[-1].done() and pending[-1].result() is False:
                raise Stopped
            now = time.monotonic()
            if now - last_report[0] >= REPORT_EVERY_S or progress.step == progress.total:
                last_report[0] = now
                pending[:] = [send(details_of(progress), 0.05 + 0.85 * progress.step / progress.total)]

        def on_checkpoint(path: Path, progress: Progress) -> None:
            asyncio.run_coroutine_threadsafe(
                store.put_file(trainings.checkpoint_key(training_id), path), loop
            ).result()
            details = {**details_of(progress), "checkpoint_step": progress.step}
            if send(details, 0.05 + 0.85 * progress.step / progress.total).result() is False:
                raise Stopped

        try:
            result = await asyncio.to_thread(
                finetune,
                base_dir,
                data_dir,
                plan=plan,
                checkpoint=checkpoint,
                on_step=on_step,
                on_checkpoint=on_checkpoint,
                work_dir=work,
            )
        except Stopped:
            log.info("training %s is no longer running; stopped", training_id)
            return {"stopped": True}
        for report in pending:  # the last step's report lands before the summary, not over it
            await asyncio.wrap_future(report)
        resumes = list((job.details or {}).get("resumed_from", []))
        if result.resumed_from:
            resumes.append(result.resumed_from)
        summary = {
            **details_of(result.progress),
            "eta_s": 0.0,
            "steps_per_s": round(result.steps_per_s, 3),
            "resumed_from": resumes,
            "phase": "saving",
        }
        await db(trainings.report, training_id=training_id, details=summary, progress=0.9)

        files: dict[str, str] = {}
        lora_dir = None
        if plan.method == "lora":
            lora_dir = work / "lora"
            lora_file = await asyncio.to_thread(save_lora, result, lora_dir)
            await store.put_file(trainings.weights_key(training_id), lora_file)
            files["pytorch_lora_weights.safetensors"] = await asyncio.to_thread(_sha256, lora_file)
        pipeline_dir = work / "pipeline"
        await asyncio.to_thread(save_pipeline, result, pipeline_dir, base_dir=base_dir, lora_dir=lora_dir)
        await put_tree(store, pipeline_dir, f"trainings/{training_id}/pipeline")
        for path in sorted(pipeline_dir.rglob("*.safetensors")):
            files[str(path.relative_to(pipeline_dir))] = await asyncio.to_thread(_sha256, path)

        validation = []
        prompts = params.get("validation_prompts") or []
        if prompts:
            from sfumato.clients.png import encode_png
            from sfumato.training.finetune import render

            images = await asyncio.to_thread(render, pipeline_dir, prompts, seed=plan.seed)
            for index, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
                key = trainings.validation_key(training_id, index)
                await store.put(key, encode_png(image, text={"prompt": prompt}))
                validation.append({"prompt": prompt, "key": key})
            await db(
                trainings.report, training_id=training_id, details={"validation": validation}, progress=0.93
            )

        lineage = {
            "training_id": training_id,
            "base_model": params["base_model"],
            "base_version": params.get("base_version"),
            "dataset_id": params["dataset_id"],
            "dataset_sha256": params.get("dataset_sha256"),
            "method": plan.method,
            "parameters": {k: v for k, v in params.items() if not k.endswith("_prefix")},
            "metrics": {
                "final_loss": summary["loss"],
                "steps_per_s": summary["steps_per_s"],
                "train_s": summary["elapsed_s"],
            },
            "validation_prompts": prompts,
            "weights": files,
            "pipeline_prefix": f"trainings/{training_id}/pipeline",
        }
        output = await _hand_off(services, pipeline_dir, params=params, lineage=lineage)
        await db(
            trainings.report,
            training_id=training_id,
            details={"output": output, "lineage": lineage, "phase": "done"},
            progress=0.99,
        )
        return {**summary, "output": output}
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


async def _hand_off(
    services: Any, pipeline_dir: Path, *, params: dict[str, Any], lineage: dict[str, Any]
) -> dict:
    """Export the pipeline as a new version of ``output_model`` and publish it (the registry's
    two functions, engineer G's side); ``{"model", "version"}``. Where the registry is not
    installed, the version stays ``None`` and the pipeline folder in the store is the result."""
    model = params["output_model"]
    try:
        from sfumato.control_plane.registry import publish_version
        from sfumato.export.versions import export_version
    except ImportError:
        log.warning("the model registry is not available: the trained pipeline is stored, not exported")
        return {"model": model, "version": None}
    repository = services.settings.model_repository
    if repository is None:
        log.warning("SFUMATO_MODEL_REPOSITORY is not set: the trained pipeline is stored, not exported")
        return {"model": model, "version": None}
    exported = await asyncio.to_thread(export_version, pipeline_dir, repository=repository, model=model)
    async with services.sessions() as session:
        published = await publish_version(
            session=session,
            triton=services.triton,
            model=model,
            exported=exported,
            lineage=lineage,
            deploy=bool(params.get("deploy")),
        )
    version = getattr(published, "version", None)
    return {"model": model, "version": str(version) if version is not None else None}
