"""``export_version``: a new numbered version of a named model in the Triton repository, laid out
as ``sfumato.model_repository`` says (served side by side in Triton: tests/control_plane/
test_registry.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sfumato.errors import ConflictError, UsageError
from sfumato.export.networks import file_sha256
from sfumato.export.triton_config import parse_pbtxt
from sfumato.export.versions import export_version
from sfumato.model_repository import (
    COMPONENTS,
    models_on_disk,
    primary_model,
    remove_version,
    triton_names,
    version_manifest,
)


@pytest.fixture
def repository(tmp_path: Path, exported_repo: Path) -> Path:
    out = tmp_path / "model_repository"
    shutil.copytree(exported_repo, out)
    return out


@pytest.mark.slow
def test_versions_and_models_lay_out_as_documented(repository: Path, demo_model: Path) -> None:
    assert primary_model(repository) == "sfumato-shapes"
    before = {c: (repository / c / "config.pbtxt").read_text() for c in COMPONENTS}

    v2 = export_version(demo_model, repository=repository, model="sfumato-shapes")
    assert (v2.version, v2.new_model, v2.pipeline_model) == (2, False, "pipeline")
    # The configs are the model's, shared by its versions: unchanged.
    assert {c: (repository / c / "config.pbtxt").read_text() for c in COMPONENTS} == before
    for component in COMPONENTS:
        assert parse_pbtxt(before[component]).version_policy.HasField("all"), component
        assert v2.paths[component] == repository / component / "2"
    spec = json.loads((repository / "pipeline" / "2" / "assets" / "pipeline.json").read_text())
    assert spec["version"] == 2 and spec["networks"]["unet"] == "unet"
    for rel, digest in v2.files.items():
        assert file_sha256(repository / rel) == digest, rel
    assert "unet/2/model.onnx" in v2.files
    assert version_manifest(repository, "sfumato-shapes", 2)["files"] == v2.files
    assert version_manifest(repository, "sfumato-shapes", 1)["model"] == "sfumato-shapes"  # the root one

    pink = export_version(demo_model, repository=repository, model="shapes-pink")
    assert (pink.version, pink.new_model) == (1, True)
    assert pink.triton_models == triton_names(repository, "shapes-pink")
    assert pink.triton_models["unet"] == "shapes-pink__unet"
    for component, name in pink.triton_models.items():
        config = parse_pbtxt((repository / name / "config.pbtxt").read_text())
        assert config.name == name
        assert config == _renamed(parse_pbtxt(before[component]), name), component
    spec = json.loads((repository / "shapes-pink__pipeline" / "1" / "assets" / "pipeline.json").read_text())
    assert spec["networks"] == {
        n: f"shapes-pink__{n}" for n in ("text_encoder", "unet", "vae_encoder", "vae_decoder")
    }
    assert models_on_disk(repository) == {"sfumato-shapes": [1, 2], "shapes-pink": [1]}

    with pytest.raises(ConflictError):
        export_version(demo_model, repository=repository, model="shapes-pink", version=1)
    with pytest.raises(UsageError):
        export_version(demo_model, repository=repository, model="Not A Name")

    assert sorted(remove_version(repository, "shapes-pink", 1)) == sorted(pink.triton_models.values())
    assert not list(repository.glob("shapes-pink__*"))
    remove_version(repository, "sfumato-shapes", 2)
    assert models_on_disk(repository) == {"sfumato-shapes": [1]}


def _renamed(config, name: str):
    config.name = name
    return config


@pytest.mark.slow
def test_a_version_that_needs_another_config_is_refused_and_leaves_nothing(
    repository: Path, demo_model: Path
) -> None:
    unet = repository / "unet" / "config.pbtxt"
    config = parse_pbtxt(unet.read_text())
    config.max_batch_size = 7  # as if the served versions were exported with other settings
    from google.protobuf import text_format

    unet.write_text(text_format.MessageToString(config))
    with pytest.raises(UsageError, match="config"):
        export_version(demo_model, repository=repository, model="sfumato-shapes")
    assert models_on_disk(repository) == {"sfumato-shapes": [1]}
    assert not (repository / "unet" / "2").exists() and not (repository / "pipeline" / "2").exists()
