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
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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

    workers: int = Field(default=2, ge=0, description="in-process workers started by `sfumato serve`")
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
    kubernetes_api_url: str | None = Field(
        default=None, description="default: in-cluster (KUBERNETES_SERVICE_HOST/PORT)"
    )
    kubernetes_namespace: str | None = Field(
        default=None, description="default: the pod's own (service-account namespace file)"
    )
    kubernetes_token_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    kubernetes_ca_file: Path | None = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")

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
