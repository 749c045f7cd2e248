"""The model registry: named models, their numbered versions, deploys and rollbacks.

A registered model is a set of Triton models and a version is Triton's own model version
(``sfumato.model_repository`` gives the layout; ``sfumato.export.versions.export_version``
writes a version). The registry adds what Triton does not know:

* **status** of each version (``loading`` while it is loaded and validated, ``ready``, ``failed``)
  and its **lineage** (base model and version, data set, training id, parameters, metrics) and
  file hashes;
* which version is **deployed** per model (the one a generation naming the model but no version
  gets) and which model is the **default** (the one a generation naming no model gets): the last
  one deployed. A deploy changes only these rows: both versions are loaded side by side in
  Triton, each job records the version it was given at submission, so a deploy (and a rollback,
  which is a deploy of the version deployed before) fails no request in flight;
* the served model's **limits and defaults**, read from its pipeline's Triton config through the
  gateway (cached there, dropped on load, unload and deploy), checked at submission.

Plain functions taking a keyword-only ``session``; each ends its transaction before it awaits
Triton (a SQLite transaction holds the writer lock).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from sfumato import model_repository as layout
from sfumato.clients.triton_grpc import TritonCallError
from sfumato.control_plane.models import Job, ModelVersion, RegisteredModel, utcnow
from sfumato.control_plane.triton_gateway import TritonGateway
from sfumato.errors import ConflictError, NotFoundError, UsageError
from sfumato.serving import contract
from sfumato.serving.contract import ModelContract

log = logging.getLogger("sfumato.registry")

ACTIVE_JOBS = ("queued", "running")
DEFAULT_VALIDATION_PROMPTS = (contract.EXAMPLE["prompt"],)
VALIDATION_SEED = 1234


# --------------------------------------------------------------------------- reads


async def list_models(*, session: AsyncSession) -> list[RegisteredModel]:
    """Every registered model with its versions, by name."""
    try:
        return list((await session.scalars(select(RegisteredModel).order_by(RegisteredModel.name))).all())
    finally:
        await session.commit()


async def get_model(*, session: AsyncSession, model: str) -> RegisteredModel:
    row = await session.get(RegisteredModel, model, populate_existing=True)
    if row is None:
        raise NotFoundError(f"no model {model!r}")
    return row


async def get_version(*, session: AsyncSession, model: str, version: int) -> ModelVersion:
    row = await session.scalar(
        select(ModelVersion)
        .where(ModelVersion.model_name == model, ModelVersion.version == version)
        .execution_options(populate_existing=True)
    )
    if row is None:
        await get_model(session=session, model=model)  # which of the two is missing
        raise NotFoundError(f"model {model!r} has no version {version}")
    return row


async def read_model(*, session: AsyncSession, model: str) -> RegisteredModel:
    """One model with its versions, in a transaction over when this returns."""
    try:
        return await get_model(session=session, model=model)
    finally:
        await session.commit()


async def read_version(*, session: AsyncSession, model: str, version: int) -> ModelVersion:
    try:
        return await get_version(session=session, model=model, version=version)
    finally:
        await session.commit()


@dataclass(frozen=True, slots=True)
class Chosen:
    """The model version a generation is given at submission."""

    model: str
    version: int
    triton_model: str  # its Triton pipeline model


async def choose(*, session: AsyncSession, model: str | None, version: int | None) -> Chosen | None:
    """The version serving a new generation: ``model`` at ``version``; no version: the model's
    deployed one; no model: the default model's. ``None`` while nothing is registered and the
    request names nothing (the service then calls ``SFUMATO_MODEL_NAME`` as before). A model or
    version that is unknown or not ready is a 422 naming the field."""
    if model is None:
        if version is not None:
            raise UsageError("model_version: needs a model", field="model_version")
        row = await session.scalar(select(RegisteredModel).where(RegisteredModel.is_default.is_(True)))
        if row is None:
            if await session.scalar(select(func.count()).select_from(RegisteredModel)):
                raise UsageError("model: no model is deployed; name one", field="model")
            return None
    else:
        row = await session.get(RegisteredModel, model)
        if row is None:
            raise UsageError(f"model: no model {model!r} (GET /v1/models lists them)", field="model")
    if version is None:
        chosen = next((v for v in row.versions if v.deployed), None)
        if chosen is None:
            raise UsageError(f"model: {row.name!r} has no deployed version; name one", field="model_version")
    else:
        chosen = next((v for v in row.versions if v.version == version), None)
        if chosen is None:
            raise UsageError(
                f"model_version: model {row.name!r} has no version {version}", field="model_version"
            )
    if chosen.status != "ready":
        raise UsageError(
            f"model_version: version {chosen.version} of {row.name!r} is {chosen.status}",
            field="model_version",
        )
    return Chosen(model=row.name, version=chosen.version, triton_model=row.triton_pipeline)


async def check_limits(
    *, triton: TritonGateway, chosen: Chosen | None, fields: dict[str, Any]
) -> ModelContract | None:
    """Check a generation's scalar fields against the served model's limits, read from its
    Triton config (cached): a 422 naming the field. Returns the limits, or ``None`` when
    Triton cannot say: the check is then left to the pipeline (a job outlives an outage)."""
    name = chosen.triton_model if chosen is not None else triton.settings.model_name
    try:
        served = await triton.model_contract(name)
    except (TritonCallError, NotFoundError) as exc:
        log.info("limits of %s not checked at submission: %s", name, exc)
        return None
    for field in contract.GENERATION_FIELDS:
        value = fields.get(field.name)
        if value is not None and not field.is_array:
            contract.check_field(field, value, served.limits)
    return served


def check_image_size(served: ModelContract | None, *, width: int, height: int) -> None:
    """An img2img / inpainting source's size against the served model's limits (422 ``image``)."""
    if served is None:
        return
    for name, value in (("width", width), ("height", height)):
        try:
            contract.check_field(contract.BY_NAME[name], value, served.limits)
        except contract.InvalidRequest as exc:
            raise contract.InvalidRequest("image", f"{width}x{height}: {exc}") from None


# --------------------------------------------------------------------------- registration


def _lineage_from_manifest(manifest: dict) -> dict[str, Any]:
    source = manifest.get("source", {})
    return {
        "source": source.get("path"),
        "source_weights": source.get("weights", {}),
        "exported_at": manifest.get("created"),
        "export_settings": manifest.get("settings", {}),
        "registered_from": "the model repository on start",
    }


async def sync_repository(*, session: AsyncSession, repository: Path | None) -> list[tuple[str, int]]:
    """Register the versions found in the model repository that the registry does not know (on
    first start: the demo model's export as version 1), as ``ready`` (``sfumato up`` loads every
    model of the repository). A model without a deployed version gets its latest deployed, and
    with no default model the primary one becomes the default. Safe to run from several processes
    at once. Returns the versions added."""
    if repository is None or not Path(repository).is_dir():
        return []
    repository = Path(repository)
    on_disk = layout.models_on_disk(repository)
    primary = layout.primary_model(repository)
    added: list[tuple[str, int]] = []
    for model, versions in on_disk.items():
        names = layout.triton_names(repository, model)
        try:
            row = await session.get(RegisteredModel, model)
            present = list(row.versions) if row is not None else []
            if row is None:
                session.add(
                    RegisteredModel(
                        name=model, triton_pipeline=names["pipeline"], triton_stream=names["pipeline_stream"]
                    )
                )
                await session.flush()
            known = {v.version for v in present}
            for version in versions:
                if version in known:
                    continue
                manifest = layout.version_manifest(repository, model, version)
                entry = ModelVersion(
                    model_name=model,
                    version=version,
                    status="ready",
                    lineage=_lineage_from_manifest(manifest),
                    files=manifest.get("files", {}),
                    ready_at=utcnow(),
                )
                session.add(entry)
                present.append(entry)
                added.append((model, version))
            if present and not any(v.deployed for v in present):
                latest = max(present, key=lambda v: v.version)
                latest.deployed, latest.deployed_at = True, utcnow()
            await session.commit()
        except IntegrityError:  # another process registered it meanwhile
            await session.rollback()
    if primary in on_disk:
        try:
            if (
                await session.scalar(select(RegisteredModel).where(RegisteredModel.is_default.is_(True)))
                is None
            ):
                await session.execute(
                    update(RegisteredModel).where(RegisteredModel.name == primary).values(is_default=True)
                )
            await session.commit()
        except IntegrityError:
            await session.rollback()
    if added:
        log.info("registered from %s: %s", repository, ", ".join(f"{m} v{v}" for m, v in added))
    return added


# --------------------------------------------------------------------------- publish


async def _load(triton: TritonGateway, names: list[str], version: int) -> None:
    """Load (or reload) Triton models in order and check that ``version`` of each is ready."""
    for name in names:
        states = await triton.load(name)
        if not await triton.version_ready(name, version):
            reason = "; ".join(f"v{s.version} {s.state} {s.reason}".strip() for s in states)
            raise ConflictError(f"Triton did not make {name} version {version} ready: {reason or 'no state'}")


async def _validate(
    triton: TritonGateway, *, triton_model: str, version: int, prompts: list[str]
) -> list[dict[str, Any]]:
    """The validation prompts through Triton, on the new version: what each produced."""
    results = []
    for index, prompt in enumerate(prompts):
        generated = await triton.generate(
            request_id=f"validation-{triton_model}-{version}-{index}",
            prompt=prompt,
            model=triton_model,
            model_version=version,
            seed=VALIDATION_SEED + index,
        )
        images = generated.images
        results.append(
            {
                "prompt": prompt,
                "seed": int(generated.seeds[0]),
                "shape": list(images.shape),
                "mean_rgb": [round(float(c), 2) for c in images.reshape(-1, 3).mean(axis=0)],
                "sha256": hashlib.sha256(images.tobytes()).hexdigest(),
                "elapsed_s": round(generated.elapsed_s, 3),
            }
        )
    return results


async def publish_version(
    *,
    session: AsyncSession,
    triton: TritonGateway,
    model: str,
    exported: Any,
    lineage: dict,
    deploy: bool,
    validation_prompts: list[str] | None = None,
) -> ModelVersion:
    """Register ``exported`` (an :class:`sfumato.export.versions.ExportedVersion` of ``model``),
    load it through Triton's repository API (networks, then the pipelines), run the validation
    prompts through Triton on that version, record its lineage, and deploy it if asked.

    ``lineage``: what it came from, e.g. ``{"base_model": ..., "base_version": ...,
    "dataset_id": ..., "training_id": ..., "parameters": {...}, "metrics": {...}}``; its
    ``validation_prompts`` (or ``parameters.validation_prompts``) are the prompts run, else
    ``validation_prompts``, else one example prompt. On failure the version is recorded
    ``failed`` with the reason, and the error raised."""
    layout.check_model_name(model)
    if exported.model != model:
        raise UsageError(f"model: {model!r} but the export is of {exported.model!r}", field="model")
    version = int(exported.version)
    prompts = list(
        validation_prompts
        or lineage.get("validation_prompts")
        or (lineage.get("parameters") or {}).get("validation_prompts")
        or DEFAULT_VALIDATION_PROMPTS
    )
    row = await session.get(RegisteredModel, model)
    if row is None:
        row = RegisteredModel(
            name=model,
            triton_pipeline=exported.triton_models["pipeline"],
            triton_stream=exported.triton_models["pipeline_stream"],
        )
        session.add(row)
    entry = ModelVersion(
        model_name=model, version=version, status="loading", lineage=dict(lineage), files=dict(exported.files)
    )
    session.add(entry)
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise ConflictError(f"model {model!r} already has a version {version}") from None
    started = time.perf_counter()
    try:
        await _load(triton, exported.load_order, version)
        loaded_s = time.perf_counter() - started
        results = await _validate(triton, triton_model=row.triton_pipeline, version=version, prompts=prompts)
    except Exception as exc:
        await session.execute(
            update(ModelVersion)
            .where(ModelVersion.id == entry.id)
            .values(status="failed", error=str(exc)[:4000])
        )
        await session.commit()
        raise
    await session.execute(
        update(ModelVersion)
        .where(ModelVersion.id == entry.id)
        .values(
            status="ready",
            validation=results,
            ready_at=utcnow(),
            lineage={**dict(lineage), "load_s": round(loaded_s, 3)},
        )
    )
    await session.commit()
    if deploy:
        return await deploy_version(session=session, triton=triton, model=model, version=version)
    return await get_version(session=session, model=model, version=version)


# --------------------------------------------------------------------------- deploy / rollback


async def deploy_version(
    *, session: AsyncSession, triton: TritonGateway, model: str, version: int
) -> ModelVersion:
    """Make ``version`` of ``model`` the one new generations get (naming the model, or naming
    none: the model becomes the default). It must be ready; it is loaded in Triton first if it
    is not (e.g. after a Triton restart that loaded less)."""
    entry = await get_version(session=session, model=model, version=version)
    triton_model = entry.model.triton_pipeline
    if entry.status != "ready":
        await session.rollback()
        raise ConflictError(f"version {version} of {model!r} is {entry.status}; only a ready one deploys")
    await session.commit()
    if not await triton.version_ready(triton_model, version):
        repository = triton.settings.model_repository
        # COMPONENTS lists the networks first: what a pipeline version calls loads before it.
        names = (
            list(layout.triton_names(repository, model).values())
            if repository is not None
            else [triton_model]
        )
        await _load(triton, names, version)
    now = utcnow()
    await session.execute(
        update(ModelVersion)
        .where(
            ModelVersion.model_name == model, ModelVersion.version != version, ModelVersion.deployed.is_(True)
        )
        .values(deployed=False)
    )
    await session.execute(
        update(ModelVersion)
        .where(ModelVersion.model_name == model, ModelVersion.version == version)
        .values(deployed=True, deployed_at=now)
    )
    await session.execute(
        update(RegisteredModel).where(RegisteredModel.name != model).values(is_default=False)
    )
    await session.execute(
        update(RegisteredModel).where(RegisteredModel.name == model).values(is_default=True)
    )
    await session.commit()
    triton.forget(triton_model)  # limits read again on the next submission
    log.info("deployed %s version %d", model, version)
    return await get_version(session=session, model=model, version=version)


async def rollback(*, session: AsyncSession, triton: TritonGateway, model: str) -> ModelVersion:
    """Deploy the version of ``model`` that was deployed before the current one."""
    row = await get_model(session=session, model=model)
    current = next((v for v in row.versions if v.deployed), None)
    earlier = [
        v for v in row.versions if v is not current and v.deployed_at is not None and v.status == "ready"
    ]
    await session.commit()
    if not earlier:
        raise ConflictError(f"model {model!r} has no earlier deployed version to roll back to")
    previous = max(earlier, key=lambda v: v.deployed_at)
    return await deploy_version(session=session, triton=triton, model=model, version=previous.version)


# --------------------------------------------------------------------------- delete


async def delete_version(*, session: AsyncSession, triton: TritonGateway, model: str, version: int) -> None:
    """Unload and delete a version nobody uses: not the deployed one, and no unfinished job
    given it (409 otherwise). Its folders leave the repository, and Triton loads the model again
    without it (the other versions keep serving); a model left with no version goes whole."""
    entry = await get_version(session=session, model=model, version=version)
    if entry.deployed:
        await session.rollback()
        raise ConflictError(f"version {version} of {model!r} is deployed; deploy another one first")
    busy = await session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.model_name == model, Job.model_version == str(version), Job.status.in_(ACTIVE_JOBS))
    )
    if busy:
        await session.rollback()
        raise ConflictError(f"version {version} of {model!r} has {busy} unfinished generations")
    triton_model = entry.model.triton_pipeline
    await session.execute(
        update(ModelVersion).where(ModelVersion.id == entry.id).values(status="loading", error="deleting")
    )
    await session.commit()
    repository = triton.settings.model_repository
    if repository is not None and version in layout.versions_on_disk(repository, model):
        names = list(layout.triton_names(repository, model).values())
        layout.remove_version(repository, model, version)
        # Pipelines first (they call the networks' version), then the networks.
        for name in [*names[len(layout.NETWORKS) :], *names[: len(layout.NETWORKS)]]:
            if (Path(repository) / name).is_dir():
                await triton.load(name)
            else:
                await triton.unload(name)
    triton.forget(triton_model)
    entry = await get_version(session=session, model=model, version=version)
    await session.delete(entry)
    await session.flush()
    remaining = await session.scalar(
        select(func.count()).select_from(ModelVersion).where(ModelVersion.model_name == model)
    )
    if not remaining:
        await session.delete(await get_model(session=session, model=model))
    await session.commit()


async def served_contract(*, triton: TritonGateway, model: RegisteredModel) -> ModelContract | None:
    """The model's limits and defaults from Triton (``None`` when Triton cannot say)."""
    try:
        return await triton.model_contract(model.triton_pipeline)
    except (TritonCallError, NotFoundError):
        return None


async def contracts(
    *, triton: TritonGateway, models: list[RegisteredModel]
) -> dict[str, ModelContract | None]:
    found = await asyncio.gather(*(served_contract(triton=triton, model=m) for m in models))
    return {m.name: c for m, c in zip(models, found, strict=True)}
