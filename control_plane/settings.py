"""The control plane's one settings object, read from ``SFUMATO_*`` environment variables.

``get_settings()`` is the cached dependency every part of the service asks; tests override it
(``app.dependency_overrides`` or ``create_app(settings=...)``). An unsafe default — the
development signing key — refuses to start outside ``SFUMATO_ENV=development``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    secret_key: SecretStr = SecretStr(DEVELOPMENT_SECRET)
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
    redis_url: str | None = Field(default=None, description="shared rate-limit storage across replicas")
    max_queued_jobs_per_user: int = Field(default=20, ge=1)
    max_body_bytes: int = Field(default=8 * 2**20, gt=0)
    max_image_bytes: int = Field(default=4 * 2**20, gt=0, description="decoded size of one input image")
    idempotency_ttl_s: int = Field(default=24 * 3600, gt=0)
    maintenance_interval_s: float = Field(
        default=600.0, gt=0, description="workers' sweep of expired idempotency keys"
    )
    max_wait_s: int = Field(default=60, ge=0, description="largest N in `Prefer: wait=N`")

    image_dir: Path | None = Field(default=None, description="local image store; default data_dir/images")
    model_name: str = "pipeline"

    @model_validator(mode="after")
    def _refuse_unsafe_defaults(self) -> Settings:
        if self.env != "development" and self.secret_key.get_secret_value() == DEVELOPMENT_SECRET:
            raise ValueError(
                "SFUMATO_SECRET_KEY is the development default; set a secret key "
                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`) "
                "or SFUMATO_ENV=development"
            )
        if len(self.secret_key.get_secret_value()) < 32:
            raise ValueError("SFUMATO_SECRET_KEY must be at least 32 characters")
        return self

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
