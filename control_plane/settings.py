"""The control plane's one settings object, read from ``SFUMATO_*`` environment variables.

``get_settings()`` is the cached dependency every part of the service asks; tests override it
(``app.dependency_overrides`` or ``create_app(settings=...)``).

No secret has a default in the source: the JWT signing key and Triton's restricted-protocol key
are ``SFUMATO_SECRET_KEY`` / ``SFUMATO_TRITON_ADMIN_KEY`` when the operator sets them, else the
installation's own, generated on first start under ``<data_dir>/secrets`` (mode 0600) and reused.
The public development key exists for the test suite only and is refused outside
``SFUMATO_ENV=test``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sfumato.secret_files import load_or_create_secret

# Public: for the test suite only (refused outside SFUMATO_ENV=test).
DEVELOPMENT_SECRET = "sfumato-development-secret-key-do-not-use-in-production"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SFUMATO_", env_file=None, extra="ignore")

    env: Literal["development", "production", "test"] = "production"
    data_dir: Path = Path("var")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy async URL; default: a SQLite file under data_dir"
    )
    triton_url: str = Field(default="127.0.0.1:8001", description="Triton gRPC host:port")
    triton_timeout_s: float = Field(default=120.0, gt=0, description="deadline of one pipeline call")
    secret_key: SecretStr | None = Field(
        default=None, description="JWT signing key (>= 32 characters); default: generated under data_dir"
    )
    triton_admin_key: SecretStr | None = Field(
        default=None,
        description="Triton's restricted-protocol header value (model repository, config, ...); "
        "default: generated under data_dir",
    )
    edge_key: SecretStr | None = Field(
        default=None,
        description="shared secret of the gRPC edge and the control plane's /internal/edge routes; "
        "default: generated under data_dir",
    )
    edge_max_call_s: float = Field(
        default=300.0, gt=0, description="longest gRPC call through the edge (its deadline is capped to it)"
    )
    jwt_algorithm: Literal["HS256", "HS384", "HS512"] = "HS256"
    jwt_audience: str = "sfumato"
    jwt_issuer: str = "sfumato"
    access_token_ttl_s: int = Field(default=3600, gt=0)

    workers: int = Field(
        default=1,
        ge=0,
        description="in-process workers started by `sfumato serve` (0: none); each holds many jobs",
    )
    worker_capacity: int | None = Field(
        default=None,
        ge=1,
        description="jobs one worker holds in flight; default: the pipeline model's instance count in Triton",
    )
    max_user_share: float = Field(
        default=0.75,
        gt=0,
        le=1,
        description="the largest share of a worker's capacity that one user's jobs may hold (rounded "
        "up); the rest stays free for other users' jobs; 1 turns the cap off",
    )
    max_outage_s: float = Field(
        default=600.0,
        ge=0,
        description="how long a job waits out Triton being unavailable before it fails",
    )
    lease_s: float = Field(default=30.0, gt=0, description="a claimed job's lease")
    heartbeat_s: float = Field(default=5.0, gt=0)
    poll_interval_s: float = Field(default=0.25, gt=0, description="idle worker's wait between claims")
    max_attempts: int = Field(default=3, ge=1)
    retry_backoff_s: float = Field(default=1.0, ge=0, description="first retry delay; doubles each attempt")

    rate_limit: str = Field(default="120/minute", description="per-principal request limit (limits syntax)")
    submit_rate_limit: str = Field(default="30/minute", description="per-principal generation submissions")
    job_read_rate_limit: str = Field(
        default="1200/minute",
        description="per-principal reads of one job (GET a generation, its images, its event streams): "
        "a budget of their own, apart from rate_limit",
    )
    login_rate_limit: str = Field(
        default="10/minute", description="password logins per (user name, client address)"
    )
    login_address_rate_limit: str = Field(
        default="60/minute", description="password logins per client address, whatever the user name"
    )
    auth_failure_rate_limit: str = Field(
        default="30/minute",
        description="failed authentications (401, any route) per client address; beyond it the "
        "address gets 429 until the window moves on",
    )
    max_requests_in_flight: int = Field(
        default=64,
        ge=1,
        description="requests handled at once; beyond it the API sheds load (503 + Retry-After at "
        "once); health, readiness and metrics are exempt",
    )
    key_usage_flush_s: float = Field(
        default=60.0, gt=0, description="how often API keys' last-use times are written (batched)"
    )
    redis_url: str | None = Field(default=None, description="shared rate-limit storage across replicas")
    max_queued_jobs_per_user: int = Field(default=20, ge=1)
    max_body_bytes: int = Field(default=8 * 2**20, gt=0)
    max_image_bytes: int = Field(default=4 * 2**20, gt=0, description="decoded size of one input image")
    max_image_pixels: int = Field(
        default=4096 * 4096, gt=0, description="pixels of one input image (read from its header)"
    )
    idempotency_ttl_s: int = Field(default=24 * 3600, gt=0)
    maintenance_interval_s: float = Field(
        default=600.0, gt=0, description="workers' sweep of expired idempotency keys"
    )
    max_wait_s: int = Field(default=60, ge=0, description="largest N in `Prefer: wait=N`")

    image_dir: Path | None = Field(default=None, description="local image store; default data_dir/images")
    storage_url: str | None = Field(
        default=None,
        description="the object store of images, inputs, data sets, weights: s3://bucket/prefix or "
        "file:///path; default: the local directory image_dir",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3 API endpoint (MinIO, Ceph, ...); default: AWS's for the region"
    )
    s3_region: str | None = Field(default=None, description="S3 region; default: boto3's (AWS_REGION, ...)")
    s3_public_endpoint_url: str | None = Field(
        default=None,
        description="where clients reach the S3 endpoint, for presigned URLs (default: s3_endpoint_url)",
    )
    storage_downloads: Literal["stream", "redirect"] = Field(
        default="stream",
        description="image downloads: streamed by the API, or a 307 redirect to a presigned URL "
        "(S3 only; clients must reach the store)",
    )
    storage_presign_s: int = Field(
        default=300, ge=1, le=7 * 24 * 3600, description="lifetime of a presigned download URL"
    )
    model_name: str = "pipeline"
    # The model registry (control_plane/registry.py): the Triton model repository it registers
    # and deletes versions in (`sfumato up` sets it to the repository it serves); None: no files.
    model_repository: Path | None = Field(
        default=None,
        description="the Triton model repository (local folder) whose models the registry "
        "registers on start and whose unused versions it deletes",
    )

    # Job events (control_plane/events.py): SSE, WebSocket, Prefer: wait, idle workers.
    event_poll_s: float = Field(
        default=0.25,
        gt=0,
        description="SQLite without Redis: how often each process reads new job events from the "
        "table (one connection per process), to see other processes' events",
    )
    event_retention_s: float = Field(
        default=24 * 3600.0,
        ge=0,
        description="events of a job finished longer ago are purged by the maintenance sweep",
    )
    worker_streaming: bool = Field(
        default=True,
        description="workers call the served model's streaming twin (pipeline_stream) and publish "
        "per-step progress; false: the plain pipeline (progress jumps from 0 to 1)",
    )
    progress_write_interval_s: float = Field(
        default=0.25,
        ge=0,
        description="a running job's progress (and its progress event) is written at most this often",
    )
    event_resync_s: float = Field(
        default=15.0,
        gt=0,
        description="a job-event subscriber with no event for this long re-reads the table (a lost "
        "notification is never permanent)",
    )

    # Trainings: where `sfumato training run --id ...` runs (the runner: `sfumato worker --queue trainings`).
    training_executor: Literal["local", "kubernetes"] = Field(
        default="local", description="local subprocess, or one Kubernetes Job per training"
    )
    training_job_template: Path | None = Field(
        default=None,
        description="kubernetes: the Job template (JSON; the Helm chart renders it) whose container "
        "'training' runs the training",
    )
    training_gpus: int = Field(default=1, ge=0, description="kubernetes: nvidia.com/gpu per training Job")
    training_kueue_queue: str | None = Field(
        default=None, description="kubernetes: Kueue LocalQueue; Jobs are created suspended with its label"
    )
    training_job_backoff_limit: int = Field(default=2, ge=0, description="kubernetes: pod retries per Job")
    training_job_ttl_s: int | None = Field(
        default=7 * 24 * 3600, ge=0, description="kubernetes: finished Jobs are deleted after this"
    )
    training_job_deadline_s: int | None = Field(
        default=None, gt=0, description="kubernetes: a Job running longer is failed (activeDeadlineSeconds)"
    )
    # Data sets and trainings (issue 10).
    max_dataset_bytes: int = Field(
        default=256 * 2**20, gt=0, description="largest data set upload (the zip, as sent)"
    )
    max_dataset_unpacked_bytes: int = Field(
        default=1024 * 2**20, gt=0, description="a data set's files unpacked, all together (zip bombs)"
    )
    max_dataset_ratio: float = Field(
        default=200.0, gt=1, description="largest unpacked / packed size of one zip entry (zip bombs)"
    )
    max_dataset_images: int = Field(default=20_000, ge=1, description="images in one data set")
    max_dataset_image_pixels: int = Field(
        default=1024 * 1024, gt=0, description="pixels of one data set image (read from its header)"
    )
    max_training_steps: int = Field(default=100_000, ge=1, description="steps of one training, however asked")
    training_runners: int = Field(
        default=0,
        ge=0,
        description="training runners started in the API process (`sfumato up` starts one when PyTorch "
        "is installed); `sfumato worker --queue trainings` runs one alone",
    )
    training_threads: int = Field(
        default=2,
        ge=1,
        description="CPU threads of a training (torch.set_num_threads), so serving stays responsive",
    )
    training_nice: int = Field(default=10, ge=0, le=19, description="local trainings run at this niceness")
    training_checkpoint_every: int = Field(
        default=100, ge=1, description="steps between a training's checkpoints"
    )
    training_min_step_s: float = Field(
        default=0.0,
        ge=0,
        description="each training step takes at least this long (a CPU budget on a shared machine)",
    )
    training_base_dir: Path = Field(
        default=Path("models/sfumato-shapes"),
        description="the diffusers folder of the served model (SFUMATO_MODEL_NAME), the base of trainings",
    )
    training_steps_per_s: float = Field(
        default=3.0, gt=0, description="a training's expected speed at batch 16, for the estimated duration"
    )
    kubernetes_api_url: str | None = Field(
        default=None, description="default: in-cluster (KUBERNETES_SERVICE_HOST/PORT)"
    )
    kubernetes_namespace: str | None = Field(
        default=None, description="default: the pod's own (service-account namespace file)"
    )
    kubernetes_token_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    kubernetes_ca_file: Path | None = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")

    # Recommendations (issue 11).
    recommend_refit_interval_s: float = Field(
        default=900.0,
        ge=0,
        description="how often the recommender is refitted and every user's rows refreshed (0: only "
        "on POST /v1/recommendations/generate)",
    )
    recommend_rows: int = Field(default=50, ge=1, le=500, description="precomputed recommendations per user")
    text_encoder_model: str = Field(
        default="text_encoder", description="the Triton model that embeds content prompts (pooler_output)"
    )
    text_tokenizer: Path = Field(
        default=Path("model_repository/pipeline/1/assets/tokenizer.json"),
        description="the served pipeline's tokenizer.json (tokenizes prompts for the text encoder)",
    )

    # Webhooks (sfumato.control_plane.webhooks): delivered by the workers' dispatcher task.
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="hosts (names or IP literals, comma-separated) the operator trusts as webhook "
        "receivers: they may use http, and their addresses are not checked against the private / "
        "loopback / metadata blocklist (an in-cluster receiver); every other webhook is https to a "
        "public address",
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="one delivery attempt, all in")
    webhook_connect_timeout_s: float = Field(default=3.0, gt=0, description="connecting to a receiver")
    webhook_max_response_bytes: int = Field(
        default=64 * 1024, ge=0, description="how much of a receiver's answer is read (the rest dropped)"
    )
    webhook_max_attempts: int = Field(default=10, ge=1, description="attempts per delivery")
    webhook_retry_base_s: float = Field(
        default=5.0, ge=0, description="first retry delay; doubles each attempt, with jitter (50-100%)"
    )
    webhook_retry_max_s: float = Field(default=3600.0, ge=0, description="the longest retry delay")
    webhook_disable_after_failures: int = Field(
        default=20, ge=1, description="failed attempts in a row after which an endpoint is disabled"
    )
    webhook_disable_after_gone: int = Field(
        default=2, ge=1, description="410 Gone answers in a row after which an endpoint is disabled"
    )
    webhook_secret_overlap_s: int = Field(
        default=24 * 3600,
        ge=0,
        description="after a secret rotation, how long deliveries carry the old secret's signature too",
    )
    webhook_concurrency: int = Field(default=16, ge=1, description="deliveries in flight per dispatcher")
    webhook_max_in_flight_per_endpoint: int = Field(
        default=4,
        ge=1,
        description="attempts in flight to one endpoint, all dispatchers together (a slow or dead "
        "receiver cannot take every slot)",
    )
    webhook_lease_s: float = Field(
        default=60.0, gt=0, description="a claimed delivery's lease (re-sent after it expires)"
    )
    webhook_poll_s: float = Field(default=1.0, gt=0, description="idle dispatcher's wait between claims")
    webhook_retention_s: int = Field(
        default=7 * 24 * 3600, gt=0, description="finished deliveries are deleted after this"
    )

    @field_validator(
        "rate_limit",
        "submit_rate_limit",
        "job_read_rate_limit",
        "login_rate_limit",
        "login_address_rate_limit",
        "auth_failure_rate_limit",
    )
    @classmethod
    def _rate_limit_syntax(cls, value: str) -> str:
        from limits import parse

        parse(value)  # ValueError names what does not parse ("10/fortnight")
        return value

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _host_list(cls, value: object) -> object:
        if isinstance(value, str):  # SFUMATO_WEBHOOK_ALLOWED_HOSTS=a.example,10.0.0.5
            value = [part for part in value.split(",")]
        if isinstance(value, list):
            value = [str(v).strip().strip("[]").lower().rstrip(".") for v in value if str(v).strip()]
        return value

    @field_validator("storage_url")
    @classmethod
    def _storage_url_scheme(cls, value: str | None) -> str | None:
        if value and not value.startswith(("s3://", "file://")):
            raise ValueError("expected s3://bucket/prefix or file:///path")
        return value

    @model_validator(mode="after")
    def _redirect_needs_s3(self) -> Settings:
        if self.storage_downloads == "redirect" and not (self.storage_url or "").startswith("s3://"):
            raise ValueError(
                "SFUMATO_STORAGE_DOWNLOADS=redirect needs an S3 store (SFUMATO_STORAGE_URL=s3://...)"
            )
        return self

    @model_validator(mode="after")
    def _refuse_unsafe_secrets(self) -> Settings:
        for name, value in (
            ("SFUMATO_SECRET_KEY", self.secret_key),
            ("SFUMATO_TRITON_ADMIN_KEY", self.triton_admin_key),
            ("SFUMATO_EDGE_KEY", self.edge_key),
        ):
            if value is None:
                continue
            if self.env != "test" and value.get_secret_value() == DEVELOPMENT_SECRET:
                raise ValueError(
                    f"{name} is the public development key, which only the test suite may use; "
                    "unset it (a key is then generated for this installation) or set your own"
                )
            if len(value.get_secret_value()) < 32:
                raise ValueError(f"{name} must be at least 32 characters")
        return self

    @property
    def secrets_dir(self) -> Path:
        return self.data_dir / "secrets"

    def signing_key(self) -> str:
        """The JWT signing key: ``SFUMATO_SECRET_KEY``, else this installation's own (generated on
        first use; the test environment alone falls back to the public development key)."""
        if self.secret_key is not None:
            return self.secret_key.get_secret_value()
        if self.env == "test":
            return DEVELOPMENT_SECRET
        return load_or_create_secret(self.secrets_dir / "jwt-signing-key")

    def triton_restricted_key(self) -> str:
        """The value of the header that Triton's restricted protocols (model repository, model
        config, shared memory, trace, logging) demand: ``SFUMATO_TRITON_ADMIN_KEY``, else this
        installation's own, generated on first use."""
        if self.triton_admin_key is not None:
            return self.triton_admin_key.get_secret_value()
        return load_or_create_secret(self.secrets_dir / "triton-admin-key")

    def edge_secret(self) -> str:
        """The secret the gRPC edge presents to ``/internal/edge/*``: ``SFUMATO_EDGE_KEY``, else this
        installation's own, generated on first use."""
        if self.edge_key is not None:
            return self.edge_key.get_secret_value()
        return load_or_create_secret(self.secrets_dir / "edge-key")

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'sfumato.db').resolve()}"

    @property
    def resolved_image_dir(self) -> Path:
        return self.image_dir or self.data_dir / "images"


@lru_cache
def get_settings() -> Settings:
    return Settings()
