"""What the gRPC edge lets through to Triton: the decision behind ``/internal/edge/authorize``.

The edge proxy (:mod:`sfumato.control_plane.edge_proxy`, Caddy) buffers each call's request body
and asks this module before it forwards anything. Enforced, in this order:

1. **Who**: ``authorization: Bearer <API key or access token>`` in the call's metadata, checked
   exactly as REST checks it (revoked keys, disabled users, expired tokens) → else UNAUTHENTICATED;
   failures are counted per caller address (the edge passes the TCP peer) with the REST budget
   (``SFUMATO_AUTH_FAILURE_RATE_LIMIT``): an address that spent it gets RESOURCE_EXHAUSTED.
2. **What**: only these RPCs of ``inference.GRPCInferenceService`` pass: ``ServerLive``,
   ``ServerReady``, ``ServerMetadata``, ``ModelReady``, ``ModelMetadata``, ``ModelInfer``,
   ``ModelStreamInfer``, and ``grpc.health.v1.Health/Check``. The model named in the request
   must be the served pipeline (``pipeline``) or its streaming twin (``pipeline_stream``). The
   model name lives in the protobuf body, where a field may repeat and the last one wins, so
   the body is parsed whole with Triton's own ``service_pb2`` messages, every message of it: a
   stream (``ModelStreamInfer``) is buffered until the client half-closes and each request in it
   is checked. Compressed messages, bodies that are not whole gRPC frames, and anything that does
   not parse are refused. Anything else → PERMISSION_DENIED.
3. **How much**: the REST request bucket (``SFUMATO_RATE_LIMIT``) for every call, and the
   submission bucket (``SFUMATO_SUBMIT_RATE_LIMIT``) once per inference request; then the
   unfinished-work quota: the user's queued/running REST jobs plus their inference requests in
   flight through the edge must stay within ``SFUMATO_MAX_QUEUED_JOBS_PER_USER`` → else
   RESOURCE_EXHAUSTED.

An allowed call gets a deadline: the client's ``grpc-timeout`` capped at
``SFUMATO_EDGE_MAX_CALL_S`` (that cap when it sent none), which the proxy passes on to Triton.
"""

from __future__ import annotations

import hmac
import re
import struct
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from tritonclient.grpc import service_pb2

from sfumato.control_plane import auth
from sfumato.control_plane.jobs import ACTIVE
from sfumato.control_plane.models import Job
from sfumato.control_plane.services import Services
from sfumato.errors import AuthenticationError, NotFoundError, RateLimitedError

INFERENCE_SERVICE = "/inference.GRPCInferenceService/"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
STREAM_SUFFIX = "_stream"

# RPC -> (request message, field naming the model), or None when the RPC names no model.
_RPCS: dict[str, tuple[type, str] | None] = {
    INFERENCE_SERVICE + "ServerLive": None,
    INFERENCE_SERVICE + "ServerReady": None,
    INFERENCE_SERVICE + "ServerMetadata": None,
    INFERENCE_SERVICE + "ModelReady": (service_pb2.ModelReadyRequest, "name"),
    INFERENCE_SERVICE + "ModelMetadata": (service_pb2.ModelMetadataRequest, "name"),
    INFERENCE_SERVICE + "ModelInfer": (service_pb2.ModelInferRequest, "model_name"),
    INFERENCE_SERVICE + "ModelStreamInfer": (service_pb2.ModelInferRequest, "model_name"),
    HEALTH_CHECK: None,
}
INFERENCE_RPCS = frozenset({INFERENCE_SERVICE + "ModelInfer", INFERENCE_SERVICE + "ModelStreamInfer"})
STREAMING_RPCS = frozenset({INFERENCE_SERVICE + "ModelStreamInfer"})

# gRPC status codes (grpc/status.h)
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNAUTHENTICATED = 16
_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to the proxy: ``outcome`` is the metric label; ``grpc_status`` 0 lets it pass."""

    outcome: str  # allowed | unauthenticated | forbidden | rate_limited | quota
    grpc_status: int = 0
    message: str = ""
    deadline_s: float | None = None

    @property
    def allowed(self) -> bool:
        return self.grpc_status == 0


class _Refused(Exception):
    def __init__(self, outcome: str, status: int, message: str) -> None:
        super().__init__(message)
        self.decision = Decision(outcome, status, message)


def check_edge_key(services: Services, presented: str | None) -> None:
    """The internal routes answer only the edge (the shared secret); to anyone else they do not exist."""
    if not presented or not hmac.compare_digest(presented, services.settings.edge_secret()):
        raise NotFoundError("not found")


def edge_models(services: Services) -> frozenset[str]:
    name = services.settings.model_name
    return frozenset({name, name + STREAM_SUFFIX})


def parse_grpc_timeout(value: str | None) -> float | None:
    """Seconds of a ``grpc-timeout`` header (``100m``, ``5S``, ...); None when absent or malformed."""
    match = _TIMEOUT.match(value or "")
    return int(match.group(1)) * _TIMEOUT_UNITS[match.group(2)] if match else None


def format_grpc_timeout(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}m"


def grpc_messages(body: bytes, message_type: type) -> list[Any]:
    """Every length-prefixed message of a gRPC request body, parsed whole (the last of a repeated
    field wins, as on the server); refuses compressed, truncated or unparsable messages."""
    messages, offset = [], 0
    while offset < len(body):
        if len(body) - offset < 5:
            raise _Refused("forbidden", PERMISSION_DENIED, "the request body is not whole gRPC messages")
        compressed, length = struct.unpack_from(">BI", body, offset)
        if compressed:
            raise _Refused("forbidden", PERMISSION_DENIED, "the edge does not accept compressed messages")
        payload = body[offset + 5 : offset + 5 + length]
        if len(payload) != length:
            raise _Refused("forbidden", PERMISSION_DENIED, "the request body is not whole gRPC messages")
        message = message_type()
        try:
            message.ParseFromString(payload)
        except DecodeError:
            raise _Refused("forbidden", PERMISSION_DENIED, "the request message does not parse") from None
        messages.append(message)
        offset += 5 + length
    return messages


async def active_jobs(*, session: AsyncSession, user_id: str) -> int:
    """The user's queued or running REST jobs."""
    query = select(func.count()).select_from(Job).where(Job.owner_id == user_id, Job.status.in_(ACTIVE))
    return int((await session.execute(query)).scalar_one())


async def authorize(
    *,
    session: AsyncSession,
    services: Services,
    rpc: str,
    authorization: str | None,
    grpc_timeout: str | None,
    call_id: str,
    address: str,
    body: bytes,
) -> Decision:
    """Decide one gRPC call (see the module docstring) and, when it passes as inference, count it
    in flight under ``call_id`` until the proxy reports its end or its deadline passes."""
    try:
        decision = await _decide(
            session=session,
            services=services,
            rpc=rpc,
            authorization=authorization,
            grpc_timeout=grpc_timeout,
            call_id=call_id,
            address=address,
            body=body,
        )
    except _Refused as refused:
        decision = refused.decision
    services.metrics.edge_requests.labels(outcome=decision.outcome).inc()
    return decision


async def _decide(
    *,
    session: AsyncSession,
    services: Services,
    rpc: str,
    authorization: str | None,
    grpc_timeout: str | None,
    call_id: str,
    address: str,
    body: bytes,
) -> Decision:
    settings = services.settings
    scheme, _, token = (authorization or "").partition(" ")
    try:
        if scheme.lower() != "bearer" or not token.strip():
            await auth.refuse_missing_credentials(services=services, address=address)
        # The same per-address throttle on failures as REST (the edge passes the caller's address).
        principal = await auth.authenticate(
            token=token.strip(), session=session, services=services, address=address
        )
    except AuthenticationError as exc:
        raise _Refused("unauthenticated", UNAUTHENTICATED, str(exc)) from None
    except RateLimitedError as exc:
        raise _Refused("rate_limited", RESOURCE_EXHAUSTED, f"{exc} (retry in {exc.retry_after} s)") from None

    if rpc not in _RPCS:
        raise _Refused(
            "forbidden",
            PERMISSION_DENIED,
            f"{rpc} does not pass the edge: only inference, metadata and health of "
            f"{', '.join(sorted(edge_models(services)))}",
        )
    spec = _RPCS[rpc]
    messages = grpc_messages(body, spec[0]) if spec is not None else []
    if spec is not None:
        if not messages:
            raise _Refused("forbidden", PERMISSION_DENIED, "the call carries no request message")
        if rpc not in STREAMING_RPCS and len(messages) != 1:
            raise _Refused("forbidden", PERMISSION_DENIED, "a unary call carries exactly one request message")
        allowed = edge_models(services)
        for message in messages:
            model = getattr(message, spec[1])
            if model not in allowed:
                raise _Refused(
                    "forbidden",
                    PERMISSION_DENIED,
                    f"model {model!r} does not pass the edge; allowed: {', '.join(sorted(allowed))}",
                )

    units = len(messages) if rpc in INFERENCE_RPCS else 0
    user = principal.user_id
    try:
        await services.limiter.hit(settings.rate_limit, scope="requests", principal=user)
        for _ in range(units):
            await services.limiter.hit(settings.submit_rate_limit, scope="submit", principal=user)
    except RateLimitedError as exc:
        raise _Refused("rate_limited", RESOURCE_EXHAUSTED, f"{exc} (retry in {exc.retry_after} s)") from None

    requested = parse_grpc_timeout(grpc_timeout)
    deadline = min(requested, settings.edge_max_call_s) if requested else settings.edge_max_call_s
    if units:
        # Reserve first, then count: concurrent calls of one user cannot both slip under the quota.
        services.edge_calls.add(call_id, user_id=principal.user_id, units=units, deadline_s=deadline)
        jobs = await active_jobs(session=session, user_id=principal.user_id)
        await session.commit()
        unfinished = jobs + services.edge_calls.count(principal.user_id)
        if unfinished > settings.max_queued_jobs_per_user:
            services.edge_calls.end([call_id])
            raise _Refused(
                "quota",
                RESOURCE_EXHAUSTED,
                f"you have {unfinished - units} unfinished jobs and gRPC calls; "
                f"the limit is {settings.max_queued_jobs_per_user}",
            )
    return Decision("allowed", deadline_s=deadline)
