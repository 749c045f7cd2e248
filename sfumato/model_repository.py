"""How named models and their numbered versions lie in the Triton model repository.

A *model* of the registry (``sfumato-shapes``, a fine-tune ``shapes-pink``, ...) is a set of
six Triton models: its four networks, its ``pipeline`` and its streaming twin
``pipeline_stream``. A *version* of it is the same number in all six: Triton's own model
versions (numbered folders), served side by side (``version_policy { all {} }``), and version
``N`` of a pipeline calls version ``N`` of its own networks through BLS. So a request chooses a
model by the pipeline's name and a version by Triton's ``model_version``, and two versions never
mix weights::

    model_repository/
      export_manifest.json            the primary model's first export (``sfumato export``)
      pipeline/1/ 2/ config.pbtxt     the primary model (bare names, as before versions existed)
      unet/1/ 2/ ...
      shapes-pink__pipeline/1/        another model: its own six Triton models, prefixed
      shapes-pink__unet/1/ ...
      <pipeline>/<N>/export_manifest.json   what export_version wrote for version N

The *primary* model keeps the bare names (``pipeline``, ``unet``, ...), so every existing
caller of ``pipeline`` keeps working; it is the model named in the repository's root
``export_manifest.json`` (its ``model``, else the source folder's name). Every other model's
Triton models are ``<model>__<component>``. The config (``config.pbtxt``) belongs to the Triton
model, so all versions of a model share their limits, defaults and batching; a version that
would need another config is another model.

This module is plain files and JSON (the control plane uses it; no torch).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from sfumato.errors import NotFoundError, UsageError

NETWORKS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
PIPELINES = ("pipeline", "pipeline_stream")
COMPONENTS = (*NETWORKS, *PIPELINES)
MANIFEST = "export_manifest.json"
SEPARATOR = "__"
MODEL_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")


def check_model_name(name: str, *, field: str = "model") -> str:
    """A registry model name: lower-case letters, digits and single hyphens, 1 to 64 characters."""
    if not isinstance(name, str) or not MODEL_NAME.match(name) or "--" in name:
        raise UsageError(
            f"{field}: {name!r} is not a model name (lower-case letters, digits and hyphens, "
            "1 to 64 characters, starting and ending with a letter or digit)",
            field=field,
        )
    return name


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}


def primary_model(repository: Path) -> str | None:
    """The model whose Triton models have the bare names (the root export's), or ``None``."""
    manifest = read_json(Path(repository) / MANIFEST)
    if not manifest:
        return None
    name = manifest.get("model") or Path(manifest.get("source", {}).get("path", "")).name
    return name or None


def triton_names(repository: Path, model: str) -> dict[str, str]:
    """``{component: Triton model name}`` for ``model`` (bare for the primary model)."""
    prefix = "" if model == primary_model(repository) else f"{model}{SEPARATOR}"
    return {component: f"{prefix}{component}" for component in COMPONENTS}


def versions_on_disk(repository: Path, model: str) -> list[int]:
    """The versions of ``model`` present in the repository (numbered folders of its pipeline)."""
    folder = Path(repository) / triton_names(repository, model)["pipeline"]
    if not (folder / "config.pbtxt").is_file():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def models_on_disk(repository: Path) -> dict[str, list[int]]:
    """Every model of the repository and its versions."""
    repository = Path(repository)
    found: dict[str, list[int]] = {}
    primary = primary_model(repository)
    if primary is not None:
        found[primary] = versions_on_disk(repository, primary)
    if repository.is_dir():
        for path in sorted(repository.glob(f"*{SEPARATOR}pipeline")):
            model = path.name[: -len(f"{SEPARATOR}pipeline")]
            if (path / "config.pbtxt").is_file() and MODEL_NAME.match(model):
                found[model] = versions_on_disk(repository, model)
    return {name: versions for name, versions in found.items() if versions}


def version_manifest(repository: Path, model: str, version: int) -> dict:
    """What the export of ``model`` version ``version`` recorded (its manifest; for the primary
    model's first export, the root manifest)."""
    repository = Path(repository)
    names = triton_names(repository, model)
    manifest = read_json(repository / names["pipeline"] / str(version) / MANIFEST)
    if not manifest and model == primary_model(repository):
        manifest = read_json(repository / MANIFEST)
    return manifest


def remove_version(repository: Path, model: str, version: int) -> list[str]:
    """Delete version ``version`` of ``model`` from every one of its Triton models; the Triton
    models left without any version are removed whole. Returns the Triton models touched (to
    load again, or unload when gone)."""
    repository = Path(repository)
    if version not in versions_on_disk(repository, model):
        raise NotFoundError(f"model {model!r} has no version {version} in {repository}")
    touched = []
    for name in triton_names(repository, model).values():
        folder = repository / name
        shutil.rmtree(folder / str(version), ignore_errors=True)
        touched.append(name)
        if folder.is_dir() and not any(p.is_dir() and p.name.isdigit() for p in folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)
    return touched
