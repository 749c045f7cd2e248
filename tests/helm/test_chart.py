"""The Helm chart, checked with the real Helm engine: lint --strict and render for the five value
sets of issue 12 (and the defaults); every manifest validated (strict) against the Kubernetes
schemas and the CRDs' published schemas; policies that must hold in every render; values the
schema must refuse. No cluster runs here: what a cluster would add (admission, scheduling, the
images running) is not exercised."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
import yaml
from helm_python.chart import lint
from helm_python.errors import HelmRenderError, HelmValuesError

from sfumato.control_plane.kubernetes_executor import KUEUE_QUEUE_LABEL, KubernetesJobExecutor
from sfumato.control_plane.settings import Settings
from sfumato.triton_server import ADMIN_KEY_HEADER, RESTRICTED_GROUPS

from .chart import (
    CHART,
    KUBERNETES_VERSIONS,
    NAMESPACE,
    RELEASE,
    ROOT,
    VALUE_SETS,
    Render,
    containers,
    job_template,
    pod_specs,
    render,
    render_set,
    validate,
    values_of,
)

SETS = list(VALUE_SETS)
TRITON = f"{RELEASE}-sfumato-triton"


def _triton(r: Render) -> dict[str, Any]:
    return r.named("Deployment", TRITON)["spec"]["template"]["spec"]


def _container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in containers(spec) if c["name"] == name]
    return found


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _config(r: Render) -> dict[str, str]:
    return r.named("ConfigMap", f"{RELEASE}-sfumato-config")["data"]


# --- the engine's verdict ---------------------------------------------------------------------


@pytest.mark.parametrize("value_set", SETS)
def test_lint_strict(value_set: str) -> None:
    for version in KUBERNETES_VERSIONS:
        report = lint(
            CHART, values_of(value_set), strict=True, namespace=NAMESPACE, kube_version=f"v{version}"
        )
        assert report["errors"] == []
        problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings fail --strict
        assert problems == []


@pytest.mark.parametrize("value_set", SETS)
def test_every_manifest_validates(value_set: str) -> None:
    r = render_set(value_set)
    assert len(r.manifests) >= 15
    for manifest in r.manifests:
        validate(manifest)  # kubernetes-validate (strict) for 1.29 and 1.37, or the CRD's schema
    names = [(m["kind"], m["metadata"]["name"]) for m in r.manifests]
    assert len(names) == len(set(names)), "two manifests of the same kind and name"


def test_the_crd_schemas_are_not_a_formality() -> None:
    """A typo in a ServiceMonitor, PrometheusRule or ScaledObject fails validation."""
    r = render_set("external-services")
    (scaled,) = r.of_kind("ScaledObject")
    broken = yaml.safe_load(yaml.safe_dump(scaled))
    broken["spec"]["minReplicaCont"] = 1
    with pytest.raises(AssertionError, match="minReplicaCont"):
        validate(broken)
    (rule,) = render_set("gpu-onnxruntime").of_kind("PrometheusRule")
    broken = yaml.safe_load(yaml.safe_dump(rule))
    broken["spec"]["groups"][0]["rules"][0]["for"] = "ten minutes"
    with pytest.raises(AssertionError, match="for"):
        validate(broken)


# --- what each value set promises -------------------------------------------------------------


def test_cpu_demo() -> None:
    r = render_set("cpu-demo")
    triton = _triton(r)
    assert all(
        "nvidia.com/gpu" not in str(c.get("resources")) for _, spec in pod_specs(r) for c in containers(spec)
    )
    export = _container(triton, "export")
    assert export["args"][:2] == ["export", "/opt/sfumato/models/sfumato-shapes"]
    assert "--target=cpu" in export["args"] and "--out=/models/repository" in export["args"]
    assert "--model-repository=/models/repository" in _container(triton, "triton")["args"]
    assert r.of_kind("PersistentVolumeClaim") and not [
        j for j in r.of_kind("Job") if "migrate" in j["metadata"]["name"]
    ]
    api = r.named("Deployment", f"{RELEASE}-sfumato-api")
    assert api["spec"]["strategy"]["type"] == "Recreate"  # one SQLite writer
    assert "--no-migrate" not in api["spec"]["template"]["spec"]["containers"][0]["args"]
    assert _env(api["spec"]["template"]["spec"]["containers"][0])["SFUMATO_WORKERS"] == "2"
    assert _config(r)["SFUMATO_STORAGE_URL"] == "file:///var/lib/sfumato/objects"
    # The helm tests run beside the API pod (the data volume is ReadWriteOnce).
    for pod in r.of_kind("Pod"):
        assert pod["spec"]["affinity"]["podAffinity"]


def test_gpu_onnxruntime() -> None:
    r = render_set("gpu-onnxruntime")
    triton = _triton(r)
    server = _container(triton, "triton")
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--model-repository=s3://acme-sfumato/prod/model_repository" in server["args"]
    assert triton["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert triton["volumes"][0] == {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "4Gi"}}
    (export_job,) = [j for j in r.of_kind("Job") if j["metadata"]["name"].endswith("-model-export")]
    assert export_job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    spec = export_job["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["fetch-source", "export"]
    export = _container(spec, "export")
    assert {"--target=onnxruntime", "--precision=fp16"} <= set(export["args"])
    assert export["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == triton["nodeSelector"] and spec["tolerations"] == triton["tolerations"]
    assert _container(spec, "upload")["args"] == [
        "storage",
        "put",
        "/work/model_repository",
        "model_repository",
    ]
    hpas = {h["metadata"]["name"]: h["spec"] for h in r.of_kind("HorizontalPodAutoscaler")}
    assert hpas[TRITON]["metrics"][0]["pods"]["metric"]["name"] == "sfumato_triton_queue_us_per_request"
    assert hpas[f"{RELEASE}-sfumato-api"]["metrics"][0]["resource"]["name"] == "cpu"
    assert (
        hpas[f"{RELEASE}-sfumato-workers"]["metrics"][0]["external"]["metric"]["name"]
        == "sfumato_queue_depth"
    )
    assert len(r.of_kind("ServiceMonitor")) == 2 and len(r.of_kind("PrometheusRule")) == 1
    adapter = yaml.safe_load(
        r.named("ConfigMap", f"{RELEASE}-sfumato-prometheus-adapter-rules")["data"]["rules.yaml"]
    )
    assert adapter["rules"][0]["name"]["as"] == "sfumato_triton_queue_us_per_request"
    assert "nv_inference_queue_duration_us" in adapter["rules"][0]["metricsQuery"]
    assert adapter["externalRules"][0]["name"]["as"] == "sfumato_queue_depth"
    assert not r.of_kind("PersistentVolumeClaim")  # PostgreSQL and S3: nothing on local disk


def test_gpu_tensorrt() -> None:
    r = render_set("gpu-tensorrt")
    triton = _triton(r)
    mount = next(m for m in _container(triton, "triton")["volumeMounts"] if m["name"] == "models")
    assert mount == {"name": "models", "mountPath": "/models", "subPath": "sd15-trt", "readOnly": True}
    claim = next(v for v in triton["volumes"] if v["name"] == "models")["persistentVolumeClaim"]
    assert claim == {"claimName": "sfumato-model-repository", "readOnly": True}
    (export_job,) = [j for j in r.of_kind("Job") if j["metadata"]["name"].endswith("-model-export")]
    spec = export_job["spec"]["template"]["spec"]
    export = _container(spec, "export")
    assert {"--target=tensorrt", "--precision=fp16", "--out=/models/repository"} <= set(export["args"])
    # TensorRT engines are built on the GPU type that serves them: Triton's node selector.
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert triton["terminationGracePeriodSeconds"] == 90
    assert "--exit-timeout-secs=60" in _container(triton, "triton")["args"]


def test_external_services() -> None:
    r = render_set("external-services")
    config = _config(r)
    assert config["SFUMATO_STORAGE_URL"] == "s3://sfumato/objects"
    assert config["SFUMATO_STORAGE_DOWNLOADS"] == "redirect"
    assert config["SFUMATO_S3_PUBLIC_ENDPOINT_URL"] == "https://objects.example.com"
    server = _container(_triton(r), "triton")
    # Triton's own syntax for an S3-compatible endpoint: s3://http://host:port/bucket/path
    assert (
        "--model-repository=s3://http://minio.minio.svc:9000/sfumato/objects/model_repository"
        in server["args"]
    )
    assert _env(server)["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": f"{RELEASE}-sfumato-storage", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    api = r.named("Deployment", f"{RELEASE}-sfumato-api")["spec"]["template"]["spec"]["containers"][0]
    assert _env(api)["SFUMATO_DATABASE_URL"] == {"secretKeyRef": {"name": "sfumato-postgres", "key": "uri"}}
    assert _env(api)["SFUMATO_REDIS_URL"] == {"secretKeyRef": {"name": "sfumato-redis", "key": "url"}}
    assert _env(api)["SFUMATO_SECRET_KEY"] == {
        "secretKeyRef": {"name": "sfumato-keys", "key": "SFUMATO_SECRET_KEY"}
    }
    assert "--no-migrate" in api["args"]
    (scaled,) = r.of_kind("ScaledObject")
    assert scaled["spec"]["triggers"][0]["metadata"]["query"].startswith("max(sfumato_queue_depth{")
    assert not [h for h in r.of_kind("HorizontalPodAutoscaler") if h["metadata"]["name"].endswith("-workers")]
    edge = r.named("Deployment", f"{RELEASE}-sfumato-edge")["spec"]["template"]["spec"]
    assert {"--tls-cert=/etc/sfumato/tls/tls.crt", "--tls-key=/etc/sfumato/tls/tls.key"} <= set(
        edge["containers"][0]["args"]
    )
    assert not [p for p in r.of_kind("Pod") if p["metadata"]["name"].endswith("-test-grpc")]  # h2c only


def test_kubernetes_training_with_kueue() -> None:
    r = render_set("kubernetes-training-kueue")
    runner_name = f"{RELEASE}-sfumato-training-runner"
    runner = r.named("Deployment", runner_name)["spec"]["template"]["spec"]
    assert runner["containers"][0]["args"] == ["worker", "--queue", "trainings"]
    assert runner["serviceAccountName"] == runner_name and runner["automountServiceAccountToken"] is True
    assert "nvidia.com/gpu" not in str(runner["containers"][0]["resources"])  # it only starts Jobs
    role = r.named("Role", runner_name)
    assert role["rules"] == [
        {
            "apiGroups": ["batch"],
            "resources": ["jobs"],
            "verbs": ["create", "get", "list", "watch", "delete"],
        },
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    ]
    assert not r.of_kind("ClusterRole") and not r.of_kind("ClusterRoleBinding")  # this namespace only
    binding = r.named("RoleBinding", runner_name)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": runner_name, "namespace": NAMESPACE}]
    config = _config(r)
    assert config["SFUMATO_TRAINING_EXECUTOR"] == "kubernetes"
    assert config["SFUMATO_TRAINING_KUEUE_QUEUE"] == "gpu-training"
    assert config["SFUMATO_TRAINING_GPUS"] == "2"
    # No other pod of the release carries a service-account token.
    for where, spec in pod_specs(r):
        if where != f"Deployment/{runner_name}":
            assert spec.get("automountServiceAccountToken") is False, where


def test_the_executor_builds_valid_jobs_from_the_charts_template() -> None:
    """The Job that KubernetesJobExecutor makes from the chart's template, with the settings the
    chart gives it, validates strict and carries the GPUs, the Kueue label and suspend."""
    r = render_set("kubernetes-training-kueue")
    config = _config(r)
    settings = Settings(
        env="test",
        training_executor="kubernetes",
        training_gpus=int(config["SFUMATO_TRAINING_GPUS"]),
        training_kueue_queue=config["SFUMATO_TRAINING_KUEUE_QUEUE"],
        training_job_backoff_limit=int(config["SFUMATO_TRAINING_JOB_BACKOFF_LIMIT"]),
        training_job_ttl_s=int(config["SFUMATO_TRAINING_JOB_TTL_S"]),
        training_job_deadline_s=int(config["SFUMATO_TRAINING_JOB_DEADLINE_S"]),
    )
    executor = KubernetesJobExecutor(
        api_url="https://kubernetes.default.svc",
        namespace=NAMESPACE,
        template=job_template(r),
        gpus=settings.training_gpus,
        kueue_queue=settings.training_kueue_queue,
        backoff_limit=settings.training_job_backoff_limit,
        ttl_after_finished_s=settings.training_job_ttl_s,
        active_deadline_s=settings.training_job_deadline_s,
    )
    job = executor.build_job("0f8e1c2d-4b5a-4c3d-9e8f-7a6b5c4d3e2f")
    validate(job)
    assert job["metadata"]["name"].startswith(f"{RELEASE}-sfumato-training-0f8e1c2d")
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-training" and job["spec"]["suspend"] is True
    assert job["spec"]["activeDeadlineSeconds"] == 86400
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "sfumato/training:0.1.0"
    assert container["args"] == ["training", "run", "--id", "0f8e1c2d-4b5a-4c3d-9e8f-7a6b5c4d3e2f"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert _env(container)["SFUMATO_DATABASE_URL"]["secretKeyRef"]["name"] == "sfumato-postgres"
    asyncio.run(executor.aclose())


# --- policies: every render -------------------------------------------------------------------


@pytest.mark.parametrize("value_set", SETS)
def test_no_container_without_requests_and_limits(value_set: str) -> None:
    for where, spec in pod_specs(render_set(value_set)):
        for container in containers(spec):
            resources = container.get("resources") or {}
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resources.get(kind, {}).get(resource), (
                        f"{where}/{container['name']}: no {kind}.{resource}"
                    )


@pytest.mark.parametrize("value_set", SETS)
def test_nothing_runs_as_root_or_writes_its_image(value_set: str) -> None:
    for where, spec in pod_specs(render_set(value_set)):
        pod = spec.get("securityContext") or {}
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) > 0, where
        assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        for container in containers(spec):
            sc = container.get("securityContext") or {}
            label = f"{where}/{container['name']}"
            assert sc.get("runAsUser", pod["runAsUser"]) != 0 and sc.get("runAsNonRoot", True) is True, label
            assert sc.get("allowPrivilegeEscalation") is False, label
            assert sc.get("readOnlyRootFilesystem") is True, label
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], label
            assert not sc.get("privileged"), label


@pytest.mark.parametrize("value_set", SETS)
def test_every_triton_port_is_covered_by_a_network_policy(value_set: str) -> None:
    r = render_set(value_set)
    triton_labels = r.named("Deployment", TRITON)["spec"]["template"]["metadata"]["labels"]
    ports = {p["containerPort"] for p in _container(_triton(r), "triton")["ports"]}
    assert ports == {8000, 8001, 8002}
    policies = [
        p
        for p in r.of_kind("NetworkPolicy")
        if all(triton_labels.get(k) == v for k, v in p["spec"]["podSelector"].get("matchLabels", {}).items())
        and p["spec"]["podSelector"].get("matchLabels")
    ]
    assert len(policies) == 1 and policies[0]["spec"]["policyTypes"] == ["Ingress"]
    rules = policies[0]["spec"]["ingress"]
    for rule in rules:
        assert rule.get("from"), "a rule open to every peer"
    covered = {port["port"] for rule in rules for port in rule["ports"]}
    assert covered == ports
    # The inference and admin ports (HTTP, gRPC) only from this release's own pods.
    for rule in rules:
        if {p["port"] for p in rule["ports"]} & {8000, 8001}:
            (peer,) = rule["from"]
            expressions = {e["key"]: e["values"] for e in peer["podSelector"]["matchExpressions"]}
            assert expressions["app.kubernetes.io/instance"] == [RELEASE]
            assert set(expressions["app.kubernetes.io/component"]) <= {
                "api",
                "workers",
                "edge",
                "training-runner",
                "training",
                "test",
            }


@pytest.mark.parametrize("value_set", SETS)
def test_no_secret_in_a_config_map_or_a_plain_variable(value_set: str) -> None:
    r = render_set(value_set)
    values = r.values
    secrets = [
        values["database"]["url"],
        values["redis"]["url"],
        values["storage"]["credentials"]["secretAccessKey"],
        values["secrets"]["secretKey"],
    ]
    secret_names = {
        "SFUMATO_SECRET_KEY",
        "SFUMATO_TRITON_ADMIN_KEY",
        "SFUMATO_EDGE_KEY",
        "SFUMATO_DATABASE_URL",
        "SFUMATO_REDIS_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }
    for config in r.of_kind("ConfigMap"):
        text = yaml.safe_dump(config["data"])
        for secret in filter(None, secrets):
            assert secret not in text, f"a secret value in ConfigMap {config['metadata']['name']}"
        assert not secret_names & set(config["data"]), config["metadata"]["name"]
    for where, spec in pod_specs(r):
        for container in containers(spec):
            for variable in container.get("env", []):
                if variable["name"] in secret_names:
                    assert "secretKeyRef" in variable.get("valueFrom", {}), (
                        f"{where}: {variable['name']} in plain text"
                    )
            assert not [a for a in container.get("args", []) for s in filter(None, secrets) if s in str(a)], (
                where
            )


@pytest.mark.parametrize("value_set", SETS)
def test_triton_is_locked_down_and_stops_gracefully(value_set: str) -> None:
    r = render_set(value_set)
    spec = _triton(r)
    server = _container(spec, "triton")
    args = server["args"]
    # The same restricted groups and header as `sfumato up` (sfumato.triton_server), the key from
    # the Secret through the container's environment ($(VAR) is expanded by the kubelet).
    restricted = f"{','.join(RESTRICTED_GROUPS)}:{ADMIN_KEY_HEADER}=$(SFUMATO_TRITON_ADMIN_KEY)"
    assert f"--grpc-restricted-protocol={restricted}" in args
    assert f"--http-restricted-api={restricted}" in args
    assert _env(server)["SFUMATO_TRITON_ADMIN_KEY"]["secretKeyRef"]["key"] == "SFUMATO_TRITON_ADMIN_KEY"
    assert "--model-control-mode=explicit" in args and "--strict-readiness=true" in args
    exit_timeout = int(next(a for a in args if a.startswith("--exit-timeout-secs=")).split("=")[1])
    assert spec["terminationGracePeriodSeconds"] >= exit_timeout
    assert server["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert {"name": "shm", "mountPath": "/dev/shm"} in server["volumeMounts"]
    gpus = r.values["triton"]["gpus"]
    assert server["resources"]["limits"].get("nvidia.com/gpu", 0) == gpus
    # The control plane reaches Triton by its Service, on gRPC.
    assert _config(r)["SFUMATO_TRITON_URL"] == f"{TRITON}:8001"


@pytest.mark.parametrize("value_set", [s for s in SETS if s not in {"defaults", "cpu-demo"}])
def test_migrations_run_before_the_pods_on_a_new_schema(value_set: str) -> None:
    r = render_set(value_set)
    (migrate,) = [j for j in r.of_kind("Job") if j["metadata"]["name"].endswith("-migrate")]
    annotations = migrate["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert migrate["spec"]["template"]["spec"]["containers"][0]["args"] == ["db", "upgrade"]
    secrets = [s for s in r.of_kind("Secret") if "helm.sh/hook" in s["metadata"].get("annotations", {})]
    for secret in secrets:  # what the migration reads exists before it runs
        assert int(secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
            annotations["helm.sh/hook-weight"]
        )
    for deployment in r.of_kind("Deployment"):
        if deployment["metadata"]["name"].endswith("-api"):
            assert "--no-migrate" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def test_the_alerts_have_one_source() -> None:
    (rule,) = render_set("gpu-onnxruntime").of_kind("PrometheusRule")
    source = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == source["groups"]
    assert (CHART / "files" / "alerts.yaml").resolve() == (
        ROOT / "deploy" / "prometheus" / "alerts.yaml"
    ).resolve()


@pytest.mark.parametrize("value_set", SETS)
def test_the_settings_given_are_settings_the_service_knows(value_set: str) -> None:
    fields = set(Settings.model_fields)
    for name in _config(render_set(value_set)):
        if name in {"FORWARDED_ALLOW_IPS", "AWS_DEFAULT_REGION"}:
            continue
        assert name.startswith("SFUMATO_") and name.removeprefix("SFUMATO_").lower() in fields, name


@pytest.mark.parametrize("value_set", SETS)
def test_images_are_pinned_and_components_complete(value_set: str) -> None:
    r = render_set(value_set)
    for where, spec in pod_specs(r):
        for container in containers(spec):
            assert re.fullmatch(r"[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", container["image"]), where
            assert not container["image"].endswith(":latest"), where
    deployments = {d["metadata"]["name"].removeprefix(f"{RELEASE}-sfumato-") for d in r.of_kind("Deployment")}
    assert {"api", "triton"} <= deployments
    assert ("edge" in deployments) == r.values["edge"]["enabled"]
    assert ("workers" in deployments) == r.values["workers"]["enabled"]
    assert ("training-runner" in deployments) == r.values["training"]["enabled"]
    pdbs = {
        p["metadata"]["name"].removeprefix(f"{RELEASE}-sfumato-") for p in r.of_kind("PodDisruptionBudget")
    }
    assert pdbs == deployments - {"training-runner"}
    tests = {p["metadata"]["name"].removeprefix(f"{RELEASE}-sfumato-") for p in r.of_kind("Pod")}
    assert {"test-readyz", "test-rest"} <= tests
    assert all(p["metadata"]["annotations"]["helm.sh/hook"] == "test" for p in r.of_kind("Pod"))


def test_notes_tell_how_to_get_a_key_and_call_rest_and_grpc() -> None:
    notes = render_set("defaults").notes
    assert f"exec deploy/{RELEASE}-sfumato-api -- sfumato admin create-key --user admin --role admin" in notes
    assert "curl -s localhost:8080/v1/generations" in notes
    assert "sfumato generate" in notes and "--grpc localhost:8003" in notes
    assert f"helm test {RELEASE}" in notes


def test_generated_keys_are_long_and_differ() -> None:
    (secret,) = [
        s for s in render_set("defaults").of_kind("Secret") if s["metadata"]["name"] == f"{RELEASE}-sfumato"
    ]
    keys = [secret["data"][k] for k in ("SFUMATO_SECRET_KEY", "SFUMATO_TRITON_ADMIN_KEY", "SFUMATO_EDGE_KEY")]
    assert len(set(keys)) == 3 and all(len(k) >= 64 for k in keys)  # 48 characters, base64


# --- values the schema refuses ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"trtion": {"gpus": 1}}, "additional properties 'trtion' not allowed"),
        ({"triton": {"gpus": -1}}, "at '/triton/gpus': minimum"),
        ({"triton": {"modelRepository": {"type": "nfs"}}}, "at '/triton/modelRepository/type'"),
        ({"triton": {"modelRepository": {"type": "pvc"}}}, "at '/triton/modelRepository/existingClaim'"),
        ({"triton": {"modelRepository": {"type": "objectStore"}}}, "at '/storage/url'"),
        ({"api": {"resources": {"limits": None}}}, "at '/api/resources': missing property 'limits'"),
        (
            {"workers": {"resources": {"limits": {"memory": "1Gi", "cpu": None}}}},
            "at '/workers/resources/limits'",
        ),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "at '/podSecurityContext/runAsNonRoot'"),
        ({"containerSecurityContext": {"readOnlyRootFilesystem": False}}, "readOnlyRootFilesystem"),
        ({"secrets": {"secretKey": "too-short"}}, "at '/secrets/secretKey'"),
        ({"secrets": {"tritonAdminKey": "a" * 32 + ",model-repository"}}, "at '/secrets/tritonAdminKey'"),
        ({"storage": {"url": "gs://bucket/prefix"}}, "at '/storage/url'"),
        ({"storage": {"downloads": "redirect"}}, "at '/storage/url'"),
        ({"database": {"url": "mysql://db/sfumato"}}, "at '/database/url'"),
        ({"workers": {"enabled": True}}, "at '/database/url'"),
        ({"api": {"replicas": 3}}, "at '/storage/url'"),
        ({"training": {"executor": "kubernetes"}}, "at '/database/url'"),
        ({"training": {"executor": "slurm"}}, "at '/training/executor'"),
        ({"training": {"kueue": {"enabled": True}}}, "at '/training/kueue/queueName'"),
        ({"modelExport": {"enabled": True}}, "at '/triton/modelRepository/type'"),
        ({"modelExport": {"target": "tensorrt"}, "triton": {"gpus": 0}}, "at '/triton/gpus'"),
        ({"keda": {"enabled": True}}, "at '/workers/enabled'"),
        ({"settings": {"SFUMATO_SECRET_KEY": "x" * 40}}, "at '/settings'"),
        ({"settings": {"RATE_LIMIT": "1/second"}}, "invalid propertyName 'RATE_LIMIT'"),
        ({"api": {"forwardedAllowIps": "*"}}, "at '/api/forwardedAllowIps'"),
        ({"images": {"triton": {"digest": "latest"}}}, "at '/images/triton/digest'"),
        ({"triton": {"extraArgs": ["--allow-http=false", "rm -rf"]}}, "at '/triton/extraArgs/1'"),
    ],
)
def test_invalid_values_are_refused_naming_the_field(values: dict[str, Any], message: str) -> None:
    with pytest.raises(HelmValuesError) as refused:
        render(values)
    assert message in str(refused.value)


def test_a_grace_period_shorter_than_tritons_exit_timeout_is_refused() -> None:
    with pytest.raises(HelmRenderError, match=r"terminationGracePeriodSeconds \(60\) must be at least"):
        render({"triton": {"exitTimeoutSeconds": 120}})
