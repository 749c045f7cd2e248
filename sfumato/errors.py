"""The one exception hierarchy of Sfumato.

Every error we raise on purpose derives from :class:`SfumatoError`, carries a message that
names the problem, and is mapped to an exit code (command line) or an HTTP status (control
plane) in exactly one place each. Anything else is a bug: it is logged with its traceback and
re-raised, never turned into a vague error.
"""

from __future__ import annotations


class SfumatoError(Exception):
    """Base of every error Sfumato raises on purpose.

    ``exit_code`` is what the command line exits with; ``http_status`` and ``title`` are what
    the control plane answers (RFC 9457 problem details, mapped in ``control_plane/problems.py``).
    """

    exit_code = 1
    http_status = 500
    title = "Internal error"


class UsageError(SfumatoError):
    """The caller asked for something invalid (bad argument, bad input folder, bad size)."""

    exit_code = 2
    http_status = 422
    title = "Invalid request"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class BadRequestError(UsageError):
    """A request parameter that does not even parse (a pagination cursor that this API did not
    make): 400 rather than 422, still naming the field."""

    http_status = 400
    title = "Bad request"


class InvalidSourceError(UsageError):
    """The source folder is not a usable diffusers Stable Diffusion pipeline."""


class MissingDependencyError(SfumatoError):
    """An optional dependency (TensorRT, the Triton binary, ...) is not installed."""

    exit_code = 2


class ParityError(SfumatoError):
    """An exported network does not match the PyTorch reference within tolerance."""

    exit_code = 3


class QualityError(SfumatoError):
    """A model's samples fall below the quality bar."""

    exit_code = 4


class NotFoundError(SfumatoError):
    """No such resource — or one the caller may not see (never revealed as 403)."""

    http_status = 404
    title = "Not found"


class ConflictError(SfumatoError):
    """The resource is not in a state that allows this (e.g. a finished job's images pending)."""

    http_status = 409
    title = "Conflict"


class AuthenticationError(SfumatoError):
    """Missing, malformed, expired or revoked credentials."""

    http_status = 401
    title = "Unauthorized"


class PermissionDeniedError(SfumatoError):
    """Authenticated, but the role does not allow this action."""

    http_status = 403
    title = "Forbidden"


class RateLimitedError(SfumatoError):
    """Too many requests, or too many queued jobs; ``retry_after`` in seconds; ``limit`` names
    the limit that was hit (a rate-limit policy, ``queued_jobs``), as counted in the metrics."""

    http_status = 429
    title = "Too many requests"

    def __init__(self, message: str, *, retry_after: int, limit: str = "requests") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.limit = limit


class PayloadTooLargeError(SfumatoError):
    http_status = 413
    title = "Payload too large"


class ServiceUnavailableError(SfumatoError):
    """A dependency (the database, Triton) is not reachable."""

    http_status = 503
    title = "Service unavailable"
