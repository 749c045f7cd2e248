"""Keyset pagination cursors, for every list route: opaque to clients, a position to us.

A list ordered newest first on ``(created_at, id)`` hands out ``encode_cursor(last.created_at,
last.id)`` as ``next_cursor``; the next request's ``decode_cursor(cursor)`` gives the position
to continue after. Anything that is not a cursor this API made — bad base64, no separator, a
naive or out-of-range timestamp, an id of the wrong shape — is a 400 naming ``cursor``.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar

from sfumato.errors import BadRequestError

_BASE64URL = re.compile(r"^[A-Za-z0-9_-]{1,400}$")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing: its rows, and the cursor of the next page (None at the end)."""

    items: list[T]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class Position:
    """Where a page ended: the last item's creation time (UTC) and id."""

    created_at: datetime
    id: str


def encode_cursor(created_at: datetime, id: str) -> str:
    """The cursor for the page after an item created at ``created_at`` with ``id``."""
    if created_at.tzinfo is None:
        raise ValueError("created_at must be timezone-aware")
    raw = f"{created_at.astimezone(UTC).isoformat()}|{id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> Position:
    """The position a cursor of :func:`encode_cursor` names; :class:`BadRequestError` otherwise."""
    try:
        if not _BASE64URL.match(cursor):
            raise ValueError("not base64url")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, _, item_id = raw.partition("|")
        if not _ID.match(item_id):
            raise ValueError("no id")
        created_at = datetime.fromisoformat(stamp)
        if created_at.tzinfo is None:
            raise ValueError("naive timestamp")
        # Out of range once moved to UTC (0001-01-01T00:00:00+01:00): OverflowError.
        created_at = created_at.astimezone(UTC)
    except (ValueError, OverflowError, UnicodeDecodeError, binascii.Error):
        raise BadRequestError("cursor: not a cursor returned by this API", field="cursor") from None
    return Position(created_at=created_at, id=item_id)


# A list ordered by a number (``GET /v1/content?sort=popular``: engagement, then id, both
# descending) hands out ``encode_value_cursor(last.value, last.id)``.
_VALUE = re.compile(r"^-?\d{1,18}$")


@dataclass(frozen=True, slots=True)
class ValuePosition:
    value: int
    id: str


def encode_value_cursor(value: int, id: str) -> str:
    return base64.urlsafe_b64encode(f"v{int(value)}|{id}".encode()).decode().rstrip("=")


def decode_value_cursor(cursor: str) -> ValuePosition:
    """The position a cursor of :func:`encode_value_cursor` names; :class:`BadRequestError` otherwise."""
    try:
        if not _BASE64URL.match(cursor):
            raise ValueError("not base64url")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, _, item_id = raw.partition("|")
        if not stamp.startswith("v") or not _VALUE.match(stamp[1:]) or not _ID.match(item_id):
            raise ValueError("not a value cursor")
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise BadRequestError("cursor: not a cursor returned by this API", field="cursor") from None
    return ValuePosition(value=int(stamp[1:]), id=item_id)
