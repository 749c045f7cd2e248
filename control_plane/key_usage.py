"""API keys' ``last_used_at``, kept off the authentication path.

Authenticating a request only reads. The time a key was used is noted in memory
(:meth:`KeyUsage.note`) when the stored value is more than :data:`RESOLUTION` old, and a
background task (:meth:`KeyUsage.run`, started by the app's lifespan) writes the notes in one
transaction every ``SFUMATO_KEY_USAGE_FLUSH_S`` seconds: at most one write per key per
:data:`RESOLUTION` per replica, whatever the request rate. The lifespan flushes once more on
shutdown; a crash loses at most one interval of last-use times, never a request.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from sqlalchemy import bindparam, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from sfumato.control_plane.models import ApiKey

RESOLUTION = timedelta(seconds=60)
log = logging.getLogger("sfumato.auth")


class KeyUsage:
    def __init__(self) -> None:
        self._pending: dict[str, datetime] = {}
        self._written: dict[str, datetime] = {}  # what this replica wrote in the last RESOLUTION

    def note(self, key: ApiKey, when: datetime) -> None:
        """Record that ``key`` was used at ``when`` (written by the next flush, if it is news:
        neither the stored value nor this replica's last write is within :data:`RESOLUTION`)."""
        known = [t for t in (key.last_used_at, self._written.get(key.id)) if t is not None]
        if known and when - max(known) < RESOLUTION:
            return
        self._pending[key.id] = when

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self, *, sessions: async_sessionmaker[AsyncSession]) -> int:
        """Write the noted times in one transaction; the number of keys written."""
        batch, self._pending = self._pending, {}
        if not batch:
            return 0
        # Counted as written from now on, so that uses during the write are not noted again.
        previous = self._written
        newest = max(batch.values())
        self._written = {k: t for k, t in previous.items() if newest - t < RESOLUTION} | batch
        try:
            async with sessions() as session:
                # One executemany on the table (Core: a key deleted meanwhile matches no row,
                # which is fine, where the ORM's bulk update would raise StaleDataError).
                table = ApiKey.__table__
                await session.execute(
                    update(table)
                    .where(table.c.id == bindparam("key_id"))
                    .values(last_used_at=bindparam("used_at")),
                    [{"key_id": key_id, "used_at": when} for key_id, when in batch.items()],
                )
                await session.commit()
        except BaseException:
            # Not written: keep the notes for the next flush (a newer note wins).
            self._pending = batch | self._pending
            self._written = previous
            raise
        return len(batch)

    async def run(self, *, sessions: async_sessionmaker[AsyncSession], interval_s: float) -> None:
        """Flush every ``interval_s`` until cancelled (a failed flush is logged and retried)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.flush(sessions=sessions)
            except Exception:
                log.exception("writing API keys' last use failed; retrying in %s s", interval_s)
