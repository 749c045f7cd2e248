"""Database tables (SQLAlchemy 2, typed declarative). Alembic migrations mirror these.

A generation job is the source of truth for a request: it is written before any work
starts, and workers move it through ``queued -> running -> succeeded | failed | canceled``
under a lease (``lease_owner``, ``lease_expires_at``) so that a job whose worker died is
claimed again. Times are timezone-aware UTC.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
FINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC in and out, on SQLite (which stores naive text) as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="member")
    password_hash: Mapped[str | None] = mapped_column(String(255), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)

    keys: Mapped[list[ApiKey]] = relationship(back_populates="user", cascade="all, delete-orphan")


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)  # the public lookup id in the key
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64), default="")
    secret_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the secret part
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)

    user: Mapped[User] = relationship(back_populates="keys")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_owner_created", "owner_id", "created_at", "id"),
        Index("ix_jobs_status_available", "status", "available_at"),
        Index("ix_jobs_status_owner_created", "status", "owner_id", "created_at"),  # fair claims
        Index("ix_jobs_status_finished", "status", "finished_at"),  # the last success (outage clock)
        Index("ix_jobs_queue_status", "queue", "status"),  # claims per queue
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32), default="")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    available_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)  # retry backoff
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    inference_s: Mapped[float | None] = mapped_column(Float, default=None)
    # When this job started waiting out Triton being unavailable (its first UNAVAILABLE failure,
    # or a worker finding it due while Triton was down); restarted once Triton serves any job.
    outage_since: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    # Webhooks (sfumato.control_plane.webhooks): where this job's events go, and which of them.
    webhook: Mapped[str | None] = mapped_column(String(2048), default=None)
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    # Which workers claim the job: ``generations`` (the generation workers) or ``trainings`` (the
    # training runner); a claim names its queue, so neither ever takes the other's jobs.
    queue: Mapped[str] = mapped_column(String(16), default="generations", server_default="generations")
    # What a running job reports beyond ``progress`` (a training: step, loss, validation images,
    # the version it made); written under its lease.
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)

    images: Mapped[list[Image]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="Image.index", lazy="selectin"
    )


class Image(Base):
    __tablename__ = "images"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(255))
    seed: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="images")


class IdempotencyRecord(Base):
    __tablename__ = "idempotency_records"

    principal: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    # NULL once the job is deleted: the key stays spent (409) until it expires.
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class JobEventRow(Base):
    """One event of a job's channel (:mod:`sfumato.control_plane.events`): written in the same
    transaction as the change it reports, numbered per job (``seq`` 1, 2, ...), so that a client
    resuming with ``Last-Event-ID`` misses nothing. ``id`` orders all events of the table (the
    SQLite poller reads them by it)."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ux_job_events_job_seq", "job_id", "seq", unique=True),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Dataset(Base):
    """An uploaded training data set: images and captions, checked, in the object store under
    ``storage_prefix`` (``metadata.jsonl`` + the images it names)."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_owner_created", "owner_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255), default="")
    num_images: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage_prefix: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))  # of the uploaded zip
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


# --------------------------------------------------------------------------- model registry
# A registered model (``sfumato-shapes``, a fine-tune ``shapes-pink``) and its numbered versions:
# the layout in Triton's repository is ``sfumato.model_repository``; what a version came from
# (base model and version, data set, training, parameters, metrics) is its ``lineage``.

MODEL_VERSION_STATUSES = ("loading", "ready", "failed")


class RegisteredModel(Base):
    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    triton_pipeline: Mapped[str] = mapped_column(String(128))  # its Triton pipeline model
    triton_stream: Mapped[str] = mapped_column(String(128))  # and the streaming twin
    # The model that serves generations naming no model (one at a time; the last one deployed).
    is_default: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model",
        cascade="all, delete-orphan",
        order_by="ModelVersion.version",
        lazy="selectin",
    )


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (Index("ux_model_versions_model_version", "model_name", "version", unique=True),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    model_name: Mapped[str] = mapped_column(ForeignKey("models.name", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="loading")
    # The version that serves generations naming this model but no version (one per model).
    deployed: Mapped[bool] = mapped_column(default=False)
    deployed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)  # the last time
    lineage: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    files: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # path -> sha256
    validation: Mapped[list[Any]] = mapped_column(JSON, default=list)  # prompts run through Triton
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)

    model: Mapped[RegisteredModel] = relationship(back_populates="versions", lazy="joined")


# --------------------------------------------------------------------------- recommendations
# The gallery (content users publish), what users do with it (interactions), their profiles and
# preferences, and the recommender's precomputed rows (issue 11).

CONTENT_TYPES = ("image",)
INTERACTION_TYPES = ("view", "like", "dislike", "download", "share", "rate", "dismiss")
# A state is one row per (user, content, slot), changed in place; an event is a row per occurrence.
STATE_SLOTS = {"like": "reaction", "dislike": "reaction", "rate": "rating"}


class Profile(Base):
    """A user's public profile and recommendation preferences (one row, made on first write)."""

    __tablename__ = "profiles"

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    display_name: Mapped[str | None] = mapped_column(String(64), default=None)
    bio: Mapped[str | None] = mapped_column(String(500), default=None)
    favorite_tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    content_types: Mapped[list[str]] = mapped_column(JSON, default=list)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The text encoder's pooled embedding of the favourite tags (float32 bytes), for cold starts.
    preference_embedding: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ContentItem(Base):
    __tablename__ = "content"
    __table_args__ = (
        Index("ix_content_created", "created_at", "id"),
        Index("ix_content_creator_created", "creator_id", "created_at", "id"),
        Index("ix_content_engagement", "engagement", "id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    creator_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(200))
    prompt: Mapped[str] = mapped_column(Text, default="")
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    tag_index: Mapped[str] = mapped_column(String(600), default="|")  # "|red|circle|": tag filter
    content_type: Mapped[str] = mapped_column(String(16), default="image")
    visibility: Mapped[str] = mapped_column(String(16), default="public")
    storage_key: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    # From a generation: where it came from (the generation may be deleted later; the copy stays).
    generation_id: Mapped[str | None] = mapped_column(String(32), default=None)
    image_index: Mapped[int | None] = mapped_column(Integer, default=None)
    seed: Mapped[int | None] = mapped_column(BigInteger, default=None)
    model_name: Mapped[str | None] = mapped_column(String(64), default=None)
    model_version: Mapped[str | None] = mapped_column(String(32), default=None)
    # The served text encoder's pooled embedding of the prompt (float32 bytes), made at publish.
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    views: Mapped[int] = mapped_column(Integer, default=0)
    likes: Mapped[int] = mapped_column(Integer, default=0)
    dislikes: Mapped[int] = mapped_column(Integer, default=0)
    downloads: Mapped[int] = mapped_column(Integer, default=0)
    shares: Mapped[int] = mapped_column(Integer, default=0)
    ratings: Mapped[int] = mapped_column(Integer, default=0)
    rating_sum: Mapped[int] = mapped_column(Integer, default=0)
    engagement: Mapped[int] = mapped_column(Integer, default=0)  # sort=popular
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Interaction(Base):
    __tablename__ = "interactions"
    __table_args__ = (
        Index("ix_interactions_user_created", "user_id", "created_at", "id"),
        Index("ix_interactions_content", "content_id"),
        Index("ix_interactions_created", "created_at"),
        # NULL slot (events) never conflicts; a state has one row per (user, content, slot).
        UniqueConstraint("user_id", "content_id", "slot", name="uq_interactions_state"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    content_id: Mapped[str] = mapped_column(ForeignKey("content.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(16))
    slot: Mapped[str | None] = mapped_column(String(16), default=None)
    rating: Mapped[int | None] = mapped_column(Integer, default=None)
    duration_s: Mapped[float | None] = mapped_column(Float, default=None)
    recommendation_id: Mapped[str | None] = mapped_column(String(32), default=None)  # from feedback
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Recommendation(Base):
    """One precomputed row: what ``GET /v1/users/{id}/recommendations`` serves, best rank first."""

    __tablename__ = "recommendations"
    __table_args__ = (Index("ix_recommendations_user_rank", "user_id", "rank"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    content_id: Mapped[str] = mapped_column(ForeignKey("content.id", ondelete="CASCADE"))
    rank: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(String(64))
    algorithm: Mapped[str] = mapped_column(String(64))
    feedback: Mapped[str | None] = mapped_column(String(16), default=None)
    feedback_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RecommenderState(Base):
    """Per user: when their rows were computed and when their inputs last changed (rows are
    recomputed when stale)."""

    __tablename__ = "recommender_users"

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    computed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    algorithm: Mapped[str | None] = mapped_column(String(64), default=None)


# --------------------------------------------------------------------------- webhooks
# The durable outbox of job events bound for users' webhooks (sfumato.control_plane.webhooks):
# a delivery row is written in the same transaction as the event it carries, claimed by a
# dispatcher under a lease, and attempted until it succeeds, fails for good or its endpoint is
# disabled. Its id is the Standard Webhooks ``webhook-id``: the same on every attempt.


class WebhookSecret(Base):
    """A user's signing secret (``whsec_...``), and the one it replaced while both are honoured."""

    __tablename__ = "webhook_secrets"

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    secret: Mapped[str] = mapped_column(String(128))
    previous_secret: Mapped[str | None] = mapped_column(String(128), default=None)
    previous_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)


class WebhookEndpoint(Base):
    """One user's webhook URL: its health (consecutive failures, 410s) and whether it is disabled."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (UniqueConstraint("owner_id", "url_hash", name="uq_webhook_endpoints_owner_url"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2048))
    url_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the URL (the unique key)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    consecutive_gone: Mapped[int] = mapped_column(Integer, default=0)  # 410 answers in a row
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    disabled_reason: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_success_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)


class WebhookDelivery(Base):
    """One event for one endpoint: the outbox row. ``status``: pending, delivered, failed, skipped."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_owner_created", "owner_id", "created_at", "id"),
        Index("ix_webhook_deliveries_job", "job_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # msg_..., the webhook-id
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(String(32))  # no foreign key: the record outlives the job
    event_type: Mapped[str] = mapped_column(String(64))  # generation.completed, ...
    body: Mapped[str] = mapped_column(Text)  # the exact JSON sent on every attempt
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)

    endpoint: Mapped[WebhookEndpoint] = relationship(lazy="joined")
    attempt_log: Mapped[list[WebhookAttempt]] = relationship(
        back_populates="delivery",
        cascade="all, delete-orphan",
        order_by="WebhookAttempt.number",
        lazy="selectin",
    )


class WebhookAttempt(Base):
    """One try of a delivery. ``outcome`` is NULL while it runs, and stays NULL if the dispatcher
    died before recording it (the delivery is then tried again, with the same webhook-id)."""

    __tablename__ = "webhook_attempts"

    delivery_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), primary_key=True
    )
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    duration_ms: Mapped[float | None] = mapped_column(Float, default=None)
    outcome: Mapped[str | None] = mapped_column(String(32), default=None)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    address: Mapped[str | None] = mapped_column(String(64), default=None)  # the pinned IP
    response_excerpt: Mapped[str | None] = mapped_column(Text, default=None)

    delivery: Mapped[WebhookDelivery] = relationship(back_populates="attempt_log")
