"""`sfumato export`: the model repository it writes, parity, configs, and bad input."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf.json_format import MessageToDict

from sfumato.cli import main
from sfumato.export.networks import NETWORKS
from sfumato.export.repository import ExportOptions, export_model_repository
from sfumato.export.triton_config import parse_pbtxt
from sfumato.serving.contract import model_limits

MODELS = (*NETWORKS, "pipeline", "pipeline_stream")


def test_cpu_export_writes_every_model_with_parity(exported_repo: Path) -> None:
    manifest = json.loads((exported_repo / "export_manifest.json").read_text())
    for name in NETWORKS:
        version = exported_repo / name / "1"
        assert (version / "model.onnx").is_file() and (version / "model.py").is_file()
    cases = manifest["parity"]["cases"]
    # every network, two batch sizes, two spatial sizes (the text encoder has no spatial axes)
    assert {c["network"] for c in cases} == set(NETWORKS)
    assert {c["batch"] for c in cases} == {1, 3}
    assert len({(c["height"], c["width"]) for c in cases if c["network"] == "unet"}) == 2
    assert max(c["relative_error"] for c in cases) <= 1e-4
    # the manifest's hashes are those of the files on disk
    from sfumato.export.networks import file_sha256

    for rel, digest in manifest["files"].items():
        assert file_sha256(exported_repo / rel) == digest
    assert manifest["source"]["weights"], "source weight hashes are recorded"


def test_every_config_parses_as_triton_model_config(exported_repo: Path) -> None:
    for name in MODELS:
        config = parse_pbtxt((exported_repo / name / "config.pbtxt").read_text())
        assert config.name == name
        if name.startswith("pipeline"):
            count = 8 if name == "pipeline" else 4
            assert config.max_batch_size == 0 and config.instance_group[0].count == count
            assert config.model_transaction_policy.decoupled is (name == "pipeline_stream")
            continue
        assert config.max_batch_size > 0
        assert config.HasField("dynamic_batching")
        assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16, 32]
        assert config.dynamic_batching.default_queue_policy.max_queue_size == 256
        assert config.model_warmup, "networks are warmed up at load"


def test_exported_onnx_has_dynamic_batch_and_spatial_axes(exported_repo: Path) -> None:
    session = ort.InferenceSession(str(exported_repo / "unet" / "1" / "model.onnx"))
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert isinstance(shapes["sample"][0], str) and isinstance(shapes["sample"][2], str)
    out = session.run(
        None,
        {
            "sample": np.zeros((5, 4, 12, 16), np.float32),
            "timestep": np.full((5,), 10.0, np.float32),
            "encoder_hidden_states": np.zeros((5, 16, 64), np.float32),
        },
    )[0]
    assert out.shape == (5, 4, 12, 16)


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_gpu_target_configs(tmp_path: Path, demo_model: Path, target: str) -> None:
    out = tmp_path / "repo"
    options = ExportOptions(
        target=target, precision="fp16", configs_only=True, image_sizes=((32, 32), (64, 64))
    )
    export_model_repository(demo_model, out, options)
    for name in NETWORKS:
        config = parse_pbtxt((out / name / "config.pbtxt").read_text())
        assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU
        if target == "tensorrt":
            assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
        else:
            assert config.backend == "onnxruntime"
            accel = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
            assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP16"
    timestep = next(
        i for i in parse_pbtxt((out / "unet" / "config.pbtxt").read_text()).input if i.name == "timestep"
    )
    assert list(timestep.dims) == [1] and timestep.HasField("reshape")
    served = model_limits(MessageToDict(parse_pbtxt((out / "pipeline" / "config.pbtxt").read_text())))
    assert (served.limits.min_size, served.limits.max_size) == (32, 64)


def test_tensorrt_without_tensorrt_is_a_clear_error(
    tmp_path: Path, demo_model: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on any machine without TensorRT
    code = main(["export", str(demo_model), "--out", str(tmp_path / "repo"), "--target", "tensorrt"])
    err = capsys.readouterr().err
    assert code == 2
    assert "tensorrt" in err and "--configs-only" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "repo" / "unet").exists()
    assert not list(tmp_path.glob(".sfumato-*")), "no staging folder is left behind"


def _bad_sources(tmp_path: Path, demo_model: Path) -> dict[str, Path]:
    not_pipeline = tmp_path / "not-a-pipeline"
    not_pipeline.mkdir()
    (not_pipeline / "weights.bin").write_bytes(b"\0")
    missing_vae = tmp_path / "missing-vae"
    shutil.copytree(demo_model, missing_vae, ignore=shutil.ignore_patterns("vae"))
    return {"no model_index.json": not_pipeline, "missing component folder vae": missing_vae}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "coreml"], "unsupported target 'coreml'"),
        (["--image-size", "36x32"], "height 36 is not a multiple of 8"),
        (["--image-size", "32xbig"], "expected HxW"),
        (["--precision", "fp16"], "fp16 needs a GPU target"),
    ],
)
def test_bad_options_fail_cleanly(
    tmp_path: Path, demo_model: Path, capsys, args: list[str], message: str
) -> None:
    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("already here")
    code = main(["export", str(demo_model), "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not list(tmp_path.glob(".sfumato-*"))


def test_bad_sources_fail_cleanly(tmp_path: Path, demo_model: Path, capsys) -> None:
    for message, src in _bad_sources(tmp_path, demo_model).items():
        code = main(["export", str(src), "--out", str(tmp_path / "repo")])
        err = capsys.readouterr().err.strip()
        assert code == 2, message
        assert message in err and len(err.splitlines()) == 1
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "repo")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "repo" / "unet").exists()


def test_failed_parity_leaves_the_old_repository_untouched(tmp_path: Path, demo_model: Path, capsys) -> None:
    out = tmp_path / "repo"
    out.mkdir()
    (out / "unet").mkdir()
    (out / "unet" / "config.pbtxt").write_text('name: "unet"')
    with pytest.raises(Exception, match="does not match PyTorch"):
        # An impossible tolerance: ONNX Runtime is close to PyTorch, but not bit-identical.
        export_model_repository(demo_model, out, ExportOptions(tolerance=1e-12))
    assert (out / "unet" / "config.pbtxt").read_text() == 'name: "unet"'
    assert sorted(p.name for p in out.iterdir()) == ["unet"]
    assert not list(tmp_path.glob(".sfumato-*"))
