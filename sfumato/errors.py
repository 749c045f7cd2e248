"""The one exception hierarchy of Sfumato.

Every error we raise on purpose derives from :class:`SfumatoError`, carries a message that
names the problem, and is mapped to an exit code (command line) or an HTTP status (control
plane) in exactly one place each. Anything else is a bug: it is logged with its traceback and
re-raised, never turned into a vague error.
"""

from __future__ import annotations


class SfumatoError(Exception):
    """Base of every error Sfumato raises on purpose."""

    exit_code = 1


class UsageError(SfumatoError):
    """The caller asked for something invalid (bad argument, bad input folder, bad size)."""

    exit_code = 2


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
