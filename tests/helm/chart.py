"""Rendering the chart with the real Helm engine (``helm-python-sdk``: Helm's Go library, offline)
and validating what comes out: built-in kinds with ``kubernetes-validate`` (strict), the
Prometheus Operator's and KEDA's kinds against their published CRD schemas (vendored in
``crds/``, see ``crds/README.md``)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from helm_python.chart import Chart

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "sfumato"
CRDS = Path(__file__).parent / "crds"
RELEASE, NAMESPACE = "prod", "sfumato"
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # the chart's kubeVersion (>= 1.29) and the newest schema

#: The five value sets of the issue (helm/sfumato/ci/), and the chart's defaults.
VALUE_SETS = {
    "defaults": None,
    "cpu-demo": CHART / "ci" / "cpu-demo-values.yaml",
    "gpu-onnxruntime": CHART / "ci" / "gpu-onnxruntime-values.yaml",
    "gpu-tensorrt": CHART / "ci" / "gpu-tensorrt-values.yaml",
    "external-services": CHART / "ci" / "external-services-values.yaml",
    "kubernetes-training-kueue": CHART / "ci" / "kubernetes-training-kueue-values.yaml",
}


def values_of(name: str) -> dict[str, Any]:
    path = VALUE_SETS[name]
    return yaml.safe_load(path.read_text()) if path else {}


@functools.cache
def chart() -> Chart:
    return Chart.load(CHART)


@dataclass(frozen=True)
class Render:
    """One value set rendered: the manifests (parsed), and the merged values the chart saw."""

    name: str
    manifests: tuple[dict[str, Any], ...]
    values: dict[str, Any]
    notes: str

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.manifests if m["kind"] == kind]

    def named(self, kind: str, name: str) -> dict[str, Any]:
        (found,) = [m for m in self.of_kind(kind) if m["metadata"]["name"] == name]
        return found


def render(values: dict[str, Any] | None, *, name: str = "custom") -> Render:
    out = chart().render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    manifests = []
    for template, text in sorted(out.items()):
        if template.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                document.setdefault("metadata", {}).setdefault("namespace", NAMESPACE)
                manifests.append(document)
    notes = next((text for template, text in out.items() if template.endswith("NOTES.txt")), "")
    return Render(
        name=name, manifests=tuple(manifests), values=chart().merge_values(values or {}), notes=notes
    )


@functools.cache
def render_set(name: str) -> Render:
    return render(values_of(name), name=name)


# --- validation ------------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """A CRD's openAPIV3Schema made strict the way kubernetes-validate's strict schemas are:
    objects with declared properties take no others (unless the CRD preserves unknown fields)."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> a validator of the CRD's published schema."""
    validators = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = _strict(version["schema"]["openAPIV3Schema"])
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def validate(manifest: dict[str, Any]) -> None:
    """Raise if ``manifest`` does not validate (strict) for every supported Kubernetes version,
    or against its CRD's schema; a kind known to neither is an error too."""
    key = (manifest["apiVersion"], manifest["kind"])
    validator = crd_validators().get(key)
    if validator is not None:
        errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
        if errors:
            raise AssertionError(
                f"{manifest['kind']} {manifest['metadata']['name']}: "
                + "; ".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
            )
        return
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(manifest, version, strict=True)


def job_template(render_: Render) -> dict[str, Any]:
    """The training Job template the chart hands KubernetesJobExecutor (JSON in a ConfigMap)."""
    config = render_.named("ConfigMap", f"{RELEASE}-sfumato-training-job")
    return json.loads(config["data"]["job.json"])


def pod_specs(render_: Render) -> list[tuple[str, dict[str, Any]]]:
    """Every pod spec the release can run: Deployments, Jobs (hooks), test Pods, and the training
    Job template."""
    specs = []
    for manifest in render_.manifests:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        if kind in {"Deployment", "Job"}:
            specs.append((f"{kind}/{name}", manifest["spec"]["template"]["spec"]))
        elif kind == "Pod":
            specs.append((f"Pod/{name}", manifest["spec"]))
    if any(
        m["kind"] == "ConfigMap" and m["metadata"]["name"].endswith("-training-job")
        for m in render_.manifests
    ):
        specs.append(("training Job template", job_template(render_)["spec"]["template"]["spec"]))
    return specs


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]
