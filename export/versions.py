"""A new numbered version of a named model in the Triton model repository.

:func:`export_version` exports a diffusers folder (a fine-tune's fused weights, a full
fine-tune, or another model) with the same code and parity checks as ``sfumato export``, into a
staging folder, then moves version ``N`` of each of the model's six Triton models into place
(``sfumato.model_repository`` describes the layout). Nothing is loaded here: the control plane
loads it through Triton's repository API (``sfumato.control_plane.registry.publish_version``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from sfumato.errors import ConflictError, UsageError
from sfumato.export import triton_config as tc
from sfumato.export.networks import file_sha256
from sfumato.export.repository import ExportOptions, export_model_repository
from sfumato.model_repository import (
    COMPONENTS,
    MANIFEST,
    NETWORKS,
    PIPELINES,
    check_model_name,
    primary_model,
    triton_names,
    version_manifest,
    versions_on_disk,
)


@dataclass(frozen=True, slots=True)
class ExportedVersion:
    """What :func:`export_version` wrote."""

    model: str
    version: int
    repository: Path
    triton_models: dict[str, str]  # component (pipeline, unet, ...) -> Triton model name
    paths: dict[str, Path]  # component -> its version folder
    files: dict[str, str]  # path relative to the repository -> sha256
    manifest_path: Path
    manifest: dict = field(default_factory=dict)
    new_model: bool = False  # the model had no version before

    @property
    def pipeline_model(self) -> str:
        return self.triton_models["pipeline"]

    @property
    def load_order(self) -> list[str]:
        """Networks first: a pipeline version loads only once what it calls is there."""
        return [self.triton_models[c] for c in (*NETWORKS, *PIPELINES)]


def options_of(repository: Path, model: str | None) -> ExportOptions:
    """The export options ``model``'s latest version was exported with (its config must stay the
    same for all versions); the defaults for a repository that has none."""
    if model is None or not versions_on_disk(repository, model):
        return ExportOptions()
    manifest = version_manifest(repository, model, versions_on_disk(repository, model)[-1])
    given = manifest.get("export_options")
    if given is None:  # a manifest from before export_options: image_sizes there are resolved
        given = dict(manifest.get("settings") or {})
        native = manifest.get("source", {}).get("native_size")
        if given.get("image_sizes") == [native]:
            given["image_sizes"] = []
    known = {f.name for f in dataclasses.fields(ExportOptions)}
    values = {}
    for key, value in given.items():
        if key not in known:
            continue
        if key == "image_sizes":
            value = tuple(tuple(size) for size in value)
        elif isinstance(value, list):
            value = tuple(value)
        values[key] = value
    return ExportOptions(**values)


def _renamed_config(path: Path, name: str) -> str:
    config = tc.parse_pbtxt(path.read_text())
    config.name = name
    config.version_policy.Clear()
    config.version_policy.all.SetInParent()  # versions serve side by side
    return text_format.MessageToString(config)


def _same_config(served: str, new: str) -> bool:
    """The same config but perhaps the version policy (an export from before versions)."""
    a, b = tc.parse_pbtxt(served), tc.parse_pbtxt(new)
    a.ClearField("version_policy")
    b.ClearField("version_policy")
    return a == b


def export_version(
    pipeline_dir: Path,
    *,
    repository: Path,
    model: str,
    version: int | None = None,
    options: ExportOptions | None = None,
) -> ExportedVersion:
    """Export ``pipeline_dir`` as version ``version`` (default: the next number) of ``model``.

    The export options are the model's own (or, for a new model, the primary model's), so that
    the new version shares its Triton models' configs; ``options`` overrides that for a new
    model. A version whose configs would differ from the served ones is refused (a config is
    shared by all versions: export it as another model). Raises ``ConflictError`` when the
    version exists, ``ParityError`` when the networks do not match PyTorch.
    """
    repository = Path(repository)
    check_model_name(model)
    repository.mkdir(parents=True, exist_ok=True)
    names = triton_names(repository, model)
    existing = versions_on_disk(repository, model)
    if version is None:
        version = max(existing, default=0) + 1
    elif not isinstance(version, int) or version < 1:
        raise UsageError(f"version: must be a positive integer, got {version!r}", field="version")
    elif version in existing:
        raise ConflictError(f"model {model!r} already has a version {version}")
    if options is None or existing:
        options = options_of(repository, model if existing else primary_model(repository))

    staging = Path(tempfile.mkdtemp(prefix=".sfumato-version-", dir=repository.parent))
    created: list[Path] = []
    try:
        staged = staging / "repository"
        result = export_model_repository(Path(pipeline_dir), staged, options)
        configs: dict[str, str] = {}
        for component, name in names.items():
            text = _renamed_config(staged / component / "config.pbtxt", name)
            current = repository / name / "config.pbtxt"
            if current.is_file() and not _same_config(current.read_text(), text):
                raise UsageError(
                    f"{name}: version {version} would need another config.pbtxt than the served "
                    f"versions (a config is shared by all versions); export it as another model",
                    field="model",
                )
            configs[name] = text
        for component in PIPELINES:
            spec_path = staged / component / "1" / "assets" / "pipeline.json"
            spec = json.loads(spec_path.read_text())
            spec.update(model=model, version=version, networks={n: names[n] for n in NETWORKS})
            spec_path.write_text(json.dumps(spec, indent=2) + "\n")
        paths: dict[str, Path] = {}
        for component in COMPONENTS:
            name = names[component]
            target = repository / name / str(version)
            (repository / name).mkdir(exist_ok=True)
            (staged / component / "1").rename(target)
            created.append(target)
            paths[component] = target
            config_path = repository / name / "config.pbtxt"
            if not config_path.is_file() or config_path.read_text() != configs[name]:
                config_path.write_text(configs[name])  # new, or an older export's version policy
        files = {
            str(p.relative_to(repository)): file_sha256(p)
            for target in created
            for p in sorted(target.rglob("*"))
            if p.is_file()
        }
        manifest = {
            **result.manifest,
            "model": model,
            "version": version,
            "triton_models": names,
            "files": files,
        }
        manifest_path = paths["pipeline"] / MANIFEST
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        for target in created:
            shutil.rmtree(target, ignore_errors=True)
        if not existing:  # a new model that failed leaves nothing behind
            for name in names.values():
                folder = repository / name
                if folder.is_dir() and not any(p.name.isdigit() for p in folder.iterdir()):
                    shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportedVersion(
        model=model,
        version=version,
        repository=repository,
        triton_models=names,
        paths=paths,
        files=files,
        manifest_path=manifest_path,
        manifest=manifest,
        new_model=not existing,
    )
