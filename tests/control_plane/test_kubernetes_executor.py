"""KubernetesJobExecutor against a local HTTPS server that answers the Jobs API calls it makes
(``kubernetes_api.py``: the one mock — no Kubernetes API server runs here). Every Job the
executor sends is validated against the Kubernetes schema (``kubernetes-validate``, strict) for
the oldest and newest Kubernetes versions the chart supports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import kubernetes_validate
import pytest

from sfumato.control_plane.kubernetes_executor import (
    KUEUE_QUEUE_LABEL,
    TRAINING_ID_ANNOTATION,
    KubernetesApiError,
    KubernetesJobExecutor,
    job_name,
)
from sfumato.control_plane.settings import Settings
from sfumato.control_plane.training_executor import ExecutorStatus
from sfumato.errors import UsageError

from .kubernetes_api import FakeKubernetes, make_ca_and_cert, serve

NAMESPACE = "ml"
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # the chart's kubeVersion range, both ends

TEMPLATE = {
    "metadata": {"name": "sfumato-training", "labels": {"app.kubernetes.io/instance": "sfumato"}},
    "spec": {
        "template": {
            "spec": {
                "serviceAccountName": "sfumato-training",
                "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
                "containers": [
                    {
                        "name": "training",
                        "image": "registry.example/sfumato-training:0.1.0",
                        "command": ["sfumato"],
                        "envFrom": [{"secretRef": {"name": "sfumato"}}],
                        "resources": {
                            "requests": {"cpu": "4", "memory": "16Gi"},
                            "limits": {"memory": "16Gi"},
                        },
                    }
                ],
            }
        }
    },
}


def validate(job: dict) -> None:
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "sa" / "token"
    path.parent.mkdir()
    path.write_text("token-one\n")
    return path


@pytest.fixture
async def cluster(tmp_path: Path, token_file: Path):  # -> (FakeKubernetes, factory(**kw) -> executor)
    state = FakeKubernetes(token="token-one")
    async with serve(state, tmp_path / "tls") as (url, ca):
        executors: list[KubernetesJobExecutor] = []

        def make(**overrides) -> KubernetesJobExecutor:
            values = {
                "api_url": url,
                "namespace": NAMESPACE,
                "template": TEMPLATE,
                "token_file": token_file,
                "ca_file": ca,
            }
            values.update(overrides)
            executor = KubernetesJobExecutor(**values)
            executors.append(executor)
            return executor

        yield state, make
        for executor in executors:
            await executor.aclose()


def _posted(state: FakeKubernetes) -> list[dict]:
    return [c["json"] for c in state.calls if c["method"] == "POST"]


async def test_a_training_runs_as_a_job_to_success(cluster) -> None:
    state, make = cluster
    executor = make()
    handle = await executor.start(training_id="tr_0123abcd")
    assert handle.startswith("sfumato-training-tr-0123abcd-")  # '_' is no DNS character: name + hash
    (job,) = _posted(state)
    validate(job)
    assert job["metadata"]["namespace"] == NAMESPACE
    assert job["metadata"]["annotations"][TRAINING_ID_ANNOTATION] == "tr_0123abcd"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["sfumato"]
    assert container["args"] == ["training", "run", "--id", "tr_0123abcd"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["cpu"] == "4"  # the template's own requests are kept
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 2 and job["spec"]["ttlSecondsAfterFinished"] == 7 * 24 * 3600
    assert "suspend" not in job["spec"] and KUEUE_QUEUE_LABEL not in job["metadata"]["labels"]

    assert await executor.poll(handle) == ExecutorStatus("pending", "waiting for a pod to start")
    state.job(NAMESPACE, handle)["status"] = {"active": 1}
    assert (await executor.poll(handle)).state == "running"
    state.job(NAMESPACE, handle)["status"] = {
        "succeeded": 1,
        "conditions": [
            {"type": "SuccessCriteriaMet", "status": "True"},
            {"type": "Complete", "status": "True"},
        ],
    }
    assert await executor.poll(handle) == ExecutorStatus("succeeded")


async def test_kueue_jobs_start_suspended_until_admitted(cluster) -> None:
    state, make = cluster
    executor = make(kueue_queue="gpu-training", gpus=2, active_deadline_s=3600)
    handle = await executor.start(training_id="t1")
    (job,) = _posted(state)
    validate(job)
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-training"
    assert job["spec"]["suspend"] is True and job["spec"]["activeDeadlineSeconds"] == 3600
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    status = await executor.poll(handle)
    assert status == ExecutorStatus("pending", "waiting for Kueue queue gpu-training")
    # Kueue admits the workload: it unsuspends the Job, the Job controller starts the pod.
    state.job(NAMESPACE, handle)["spec"]["suspend"] = False
    state.job(NAMESPACE, handle)["status"] = {"active": 1}
    assert await executor.poll(handle) == ExecutorStatus("running", "1 pod(s) active")


async def test_a_failed_job_reports_its_reason_and_log_tail(cluster) -> None:
    state, make = cluster
    executor = make()
    handle = await executor.start(training_id="t2")
    state.logs[handle] = "\n".join(f"step {i}" for i in range(100)) + "\nRuntimeError: CUDA out of memory"
    state.job(NAMESPACE, handle)["status"] = {
        "failed": 3,
        "conditions": [
            {
                "type": "Failed",
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
            }
        ],
    }
    status = await executor.poll(handle)
    assert status.state == "failed"
    assert "BackoffLimitExceeded: Job has reached the specified backoff limit" in status.message
    assert status.message.endswith("RuntimeError: CUDA out of memory")
    assert "step 81" in status.message and "step 80" not in status.message  # the last 20 lines
    log_call = next(c for c in state.calls if c["path"].endswith("/log"))
    assert log_call["path"] == f"/api/v1/namespaces/{NAMESPACE}/pods/{handle}-1/log"  # the newest pod
    assert log_call["query"] == {"container": "training", "tailLines": "20"}


async def test_starting_twice_runs_one_job(cluster) -> None:
    state, make = cluster
    first = await make().start(training_id="t3")
    again = await make().start(training_id="t3")  # a runner that restarted and claims it again
    assert again == first and len(state.jobs) == 1
    # A Job of that name that runs another training is not taken for this one.
    state.job(NAMESPACE, first)["metadata"]["annotations"][TRAINING_ID_ANNOTATION] = "someone-else"
    with pytest.raises(KubernetesApiError, match="does not run training t3"):
        await make().start(training_id="t3")


async def test_cancel_deletes_the_job_and_its_pods(cluster) -> None:
    state, make = cluster
    executor = make()
    handle = await executor.start(training_id="t4")
    await executor.cancel(handle)
    delete = next(c for c in state.calls if c["method"] == "DELETE")
    assert delete["path"] == f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{handle}"
    assert delete["query"] == {"propagationPolicy": "Background"}  # pods are deleted with the Job
    assert not state.jobs
    await executor.cancel(handle)  # already gone: no error
    status = await executor.poll(handle)
    assert status.state == "failed" and "is gone" in status.message


async def test_the_token_is_read_again_for_every_call(cluster, token_file: Path) -> None:
    state, make = cluster
    executor = make()
    handle = await executor.start(training_id="t5")
    token_file.write_text("token-two\n")  # the kubelet rotated the projected token
    state.token = "token-two"
    assert (await executor.poll(handle)).state == "pending"
    state.token = "token-three"  # a token the API no longer accepts: an error, not a guess
    with pytest.raises(KubernetesApiError, match="HTTP 401"):
        await executor.poll(handle)


async def test_the_cluster_ca_is_checked(cluster, tmp_path: Path) -> None:
    _state, make = cluster
    other_ca, _, _ = make_ca_and_cert(tmp_path / "other")
    with pytest.raises(KubernetesApiError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        await make(ca_file=other_ca).start(training_id="t6")


async def test_cpu_only_jobs_request_no_gpu(cluster) -> None:
    state, make = cluster
    await make(gpus=0, ttl_after_finished_s=None).start(training_id="t7")
    (job,) = _posted(state)
    validate(job)
    resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in resources["requests"] and "nvidia.com/gpu" not in resources["limits"]
    assert "ttlSecondsAfterFinished" not in job["spec"]


@pytest.mark.parametrize(
    "training_id", ["abc", "ABC", "a" * 80, "tr_" + "9" * 60, "--x--", "0f8e1c2d-4b5a-4c3d-9e8f-7a6b5c4d3e2f"]
)
def test_job_names_are_dns_labels_unique_to_the_training(training_id: str) -> None:
    name = job_name("my-release-sfumato-training", training_id)
    assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
    assert name != job_name("my-release-sfumato-training", training_id + "x")


def test_the_template_must_name_the_training_container() -> None:
    template = json.loads(json.dumps(TEMPLATE))
    template["spec"]["template"]["spec"]["containers"][0]["name"] = "main"
    executor = KubernetesJobExecutor(api_url="https://127.0.0.1:1", namespace="ml", template=template)
    with pytest.raises(UsageError, match="no container named 'training'"):
        executor.build_job("t8")


def test_from_settings(tmp_path: Path, token_file: Path) -> None:
    template_file = tmp_path / "training-job.json"
    template_file.write_text(json.dumps(TEMPLATE))
    settings = Settings(
        env="test",
        training_executor="kubernetes",
        training_job_template=template_file,
        training_gpus=4,
        training_kueue_queue="team-a",
        kubernetes_api_url="https://10.0.0.1:443",
        kubernetes_namespace="ml",
        kubernetes_token_file=token_file,
    )
    executor = KubernetesJobExecutor.from_settings(settings)
    assert (executor.api_url, executor.namespace, executor.gpus, executor.kueue_queue) == (
        "https://10.0.0.1:443",
        "ml",
        4,
        "team-a",
    )
    validate(executor.build_job("t9"))
    with pytest.raises(UsageError, match="SFUMATO_TRAINING_JOB_TEMPLATE"):
        KubernetesJobExecutor.from_settings(Settings(env="test", training_executor="kubernetes"))
