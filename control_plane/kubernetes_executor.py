"""Trainings as Kubernetes Jobs (``SFUMATO_TRAINING_EXECUTOR=kubernetes``).

:class:`KubernetesJobExecutor` implements :class:`~sfumato.control_plane.training_executor.TrainingExecutor`
against the Kubernetes API with plain httpx, from inside the cluster: the pod's service-account
token (read again for every call: the kubelet rotates bound tokens) and the cluster CA.

* ``start`` creates one ``batch/v1`` Job per training from the pod template that the Helm chart
  renders (``SFUMATO_TRAINING_JOB_TEMPLATE``, JSON: image, environment, security context, node
  selector, tolerations, volumes): container ``training`` runs ``sfumato training run --id ID``
  with ``SFUMATO_TRAINING_GPUS`` GPUs (``nvidia.com/gpu`` requested and limited). With Kueue
  (``SFUMATO_TRAINING_KUEUE_QUEUE``) the Job carries ``kueue.x-k8s.io/queue-name`` and is created
  suspended: Kueue unsuspends it when the queue admits it. The Job's name derives from the
  training id, so a second ``start`` of the same training (a runner that restarted) finds the
  first Job instead of starting another.
* ``poll`` reads the Job's conditions: ``Complete`` → succeeded, ``Failed`` → failed (with the
  reason, and the tail of the last pod's log), suspended → pending (waiting for Kueue), active
  pods → running.
* ``cancel`` deletes the Job with background propagation (its pods go with it).

RBAC (the chart's Role): ``batch/jobs`` create, get, list, watch, delete; ``pods`` get, list;
``pods/log`` get — in the release's namespace only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from sfumato.control_plane.training_executor import ExecutorStatus
from sfumato.errors import SfumatoError, UsageError

if TYPE_CHECKING:
    from sfumato.control_plane.settings import Settings

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
TRAINING_ID_ANNOTATION = "sfumato.dev/training-id"
CONTAINER = "training"
GPU_RESOURCE = "nvidia.com/gpu"
LOG_TAIL_LINES = 20


class KubernetesApiError(SfumatoError):
    """The Kubernetes API refused a call (or could not be reached)."""


def job_name(prefix: str, training_id: str) -> str:
    """A DNS-1123 label (≤ 63 characters: the name also becomes the pods' ``job-name`` label)
    unique to the training: ``<prefix>-<id>``, with a hash of the id when the id had to be cut
    or changed to fit."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", training_id.lower()).strip("-")
    name = f"{prefix}-{cleaned}"
    if cleaned != training_id or len(name) > 63:
        digest = hashlib.sha256(training_id.encode()).hexdigest()[:10]
        name = f"{name[: 63 - 11].rstrip('-')}-{digest}"
    return name


@dataclass
class KubernetesJobExecutor:
    api_url: str
    namespace: str
    template: dict[str, Any]  # a batch/v1 Job skeleton: metadata (name = the Jobs' prefix), spec.template
    token_file: Path = SERVICE_ACCOUNT_DIR / "token"
    ca_file: Path | None = SERVICE_ACCOUNT_DIR / "ca.crt"
    gpus: int = 1
    kueue_queue: str | None = None
    backoff_limit: int = 2
    ttl_after_finished_s: int | None = 7 * 24 * 3600
    active_deadline_s: int | None = None
    timeout_s: float = 30.0
    _client: httpx.AsyncClient | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> KubernetesJobExecutor:
        template_path = settings.training_job_template
        if template_path is None:
            raise UsageError(
                "SFUMATO_TRAINING_JOB_TEMPLATE: the Kubernetes executor needs the Job template file"
            )
        try:
            template = json.loads(Path(template_path).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"SFUMATO_TRAINING_JOB_TEMPLATE: cannot read {template_path}: {exc}") from None
        api_url = settings.kubernetes_api_url or in_cluster_api_url()
        namespace = settings.kubernetes_namespace or (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip()
        return cls(
            api_url=api_url,
            namespace=namespace,
            template=template,
            token_file=settings.kubernetes_token_file,
            ca_file=settings.kubernetes_ca_file,
            gpus=settings.training_gpus,
            kueue_queue=settings.training_kueue_queue,
            backoff_limit=settings.training_job_backoff_limit,
            ttl_after_finished_s=settings.training_job_ttl_s,
            active_deadline_s=settings.training_job_deadline_s,
        )

    # --- the Job ----------------------------------------------------------------------------

    def build_job(self, training_id: str) -> dict[str, Any]:
        """The Job that runs ``training_id``: the template, completed."""
        job = copy.deepcopy(self.template)
        meta = job.setdefault("metadata", {})
        prefix = meta.pop("name", None) or "sfumato-training"
        meta.pop("generateName", None)
        meta["name"] = job_name(prefix, training_id)
        meta["namespace"] = self.namespace
        meta.setdefault("labels", {})["app.kubernetes.io/component"] = "training"
        meta.setdefault("annotations", {})[TRAINING_ID_ANNOTATION] = training_id
        job["apiVersion"], job["kind"] = "batch/v1", "Job"
        spec = job.setdefault("spec", {})
        spec["backoffLimit"] = self.backoff_limit
        if self.ttl_after_finished_s is not None:
            spec["ttlSecondsAfterFinished"] = self.ttl_after_finished_s
        if self.active_deadline_s is not None:
            spec["activeDeadlineSeconds"] = self.active_deadline_s
        if self.kueue_queue:
            meta["labels"][KUEUE_QUEUE_LABEL] = self.kueue_queue
            spec["suspend"] = True  # Kueue admits (unsuspends) it when the queue has room
        pod = spec.setdefault("template", {})
        pod_meta = pod.setdefault("metadata", {})
        pod_meta.setdefault("labels", {})["app.kubernetes.io/component"] = "training"
        pod_meta.setdefault("annotations", {})[TRAINING_ID_ANNOTATION] = training_id
        pod_spec = pod.setdefault("spec", {})
        pod_spec["restartPolicy"] = "Never"  # the Job's backoffLimit retries, not the kubelet
        containers = pod_spec.get("containers") or []
        container = next((c for c in containers if c.get("name") == CONTAINER), None)
        if container is None:
            raise UsageError(f"the training Job template has no container named {CONTAINER!r}")
        container["args"] = ["training", "run", "--id", training_id]
        resources = container.setdefault("resources", {})
        for kind in ("requests", "limits"):
            quantities = resources.setdefault(kind, {})
            if self.gpus > 0:
                quantities[GPU_RESOURCE] = str(self.gpus)
            else:
                quantities.pop(GPU_RESOURCE, None)
        return job

    # --- the API ----------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            verify: ssl.SSLContext | bool = True
            if self.api_url.startswith("https://") and self.ca_file is not None:
                verify = ssl.create_default_context(cafile=str(self.ca_file))
            self._client = httpx.AsyncClient(base_url=self.api_url, verify=verify, timeout=self.timeout_s)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        token = Path(self.token_file).read_text().strip()  # re-read: bound tokens rotate
        try:
            return await self._http().request(
                method,
                path,
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
                **kwargs,
            )
        except httpx.HTTPError as exc:
            raise KubernetesApiError(f"Kubernetes API {method} {path}: {exc}") from exc

    @staticmethod
    def _fail(response: httpx.Response, what: str) -> KubernetesApiError:
        try:
            message = response.json().get("message") or response.text
        except ValueError:
            message = response.text
        return KubernetesApiError(f"{what}: HTTP {response.status_code}: {message[:500]}")

    def _jobs(self, name: str = "") -> str:
        base = f"/apis/batch/v1/namespaces/{self.namespace}/jobs"
        return f"{base}/{name}" if name else base

    async def start(self, *, training_id: str) -> str:
        job = self.build_job(training_id)
        name = job["metadata"]["name"]
        response = await self._call("POST", self._jobs(), json=job)
        if response.status_code in (200, 201):
            return name
        if response.status_code == 409:  # AlreadyExists: this training's Job, from an earlier start?
            existing = await self._call("GET", self._jobs(name))
            if existing.status_code == 200:
                annotations = existing.json().get("metadata", {}).get("annotations") or {}
                if annotations.get(TRAINING_ID_ANNOTATION) == training_id:
                    return name
            raise KubernetesApiError(f"a Job named {name} exists and does not run training {training_id}")
        raise self._fail(response, f"creating Job {name}")

    async def poll(self, handle: str) -> ExecutorStatus:
        response = await self._call("GET", self._jobs(handle))
        if response.status_code == 404:
            return ExecutorStatus("failed", f"Kubernetes Job {handle} is gone (deleted outside Sfumato?)")
        if response.status_code != 200:
            raise self._fail(response, f"reading Job {handle}")
        job = response.json()
        status = job.get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
        if "Complete" in conditions:
            return ExecutorStatus("succeeded")
        failed = conditions.get("Failed") or conditions.get("FailureTarget")
        if failed is not None:
            reason = ": ".join(filter(None, [failed.get("reason"), failed.get("message")]))
            log_tail = await self._log_tail(handle)
            message = f"Kubernetes Job {handle} failed ({reason or 'no reason given'})"
            return ExecutorStatus(
                "failed", f"{message}; last log lines:\n{log_tail}" if log_tail else message
            )
        if (job.get("spec") or {}).get("suspend") or "Suspended" in conditions:
            queue = (job.get("metadata", {}).get("labels") or {}).get(KUEUE_QUEUE_LABEL)
            return ExecutorStatus("pending", f"waiting for Kueue queue {queue}" if queue else "suspended")
        if status.get("active"):
            return ExecutorStatus("running", f"{status['active']} pod(s) active")
        return ExecutorStatus("pending", "waiting for a pod to start")

    async def _log_tail(self, name: str) -> str:
        """The last lines of the newest pod's log (best effort: '' when there is none)."""
        pods = await self._call(
            "GET", f"/api/v1/namespaces/{self.namespace}/pods", params={"labelSelector": f"job-name={name}"}
        )
        if pods.status_code != 200:
            return ""
        items = pods.json().get("items") or []
        if not items:
            return ""
        newest = max(items, key=lambda pod: pod.get("metadata", {}).get("creationTimestamp") or "")
        pod_name = newest["metadata"]["name"]
        log = await self._call(
            "GET",
            f"/api/v1/namespaces/{self.namespace}/pods/{pod_name}/log",
            params={"container": CONTAINER, "tailLines": str(LOG_TAIL_LINES)},
        )
        return log.text.strip() if log.status_code == 200 else ""

    async def cancel(self, handle: str) -> None:
        response = await self._call("DELETE", self._jobs(handle), params={"propagationPolicy": "Background"})
        if response.status_code not in (200, 202, 404):
            raise self._fail(response, f"deleting Job {handle}")


def in_cluster_api_url() -> str:
    import os

    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise UsageError(
            "SFUMATO_KUBERNETES_API_URL is unset and this is not a pod (no KUBERNETES_SERVICE_HOST)"
        )
    host = f"[{host}]" if ":" in host else host
    return f"https://{host}:{port}"
