"""gRPC calls in flight through the edge, per user: the edge's share of the unfinished-work quota.

A call is added when the edge authorizes it and removed when the proxy's access log says it ended
(:mod:`sfumato.control_plane.edge_proxy` forwards those lines). Every entry also carries an expiry,
the call's own deadline: the edge caps each call's ``grpc-timeout`` at ``SFUMATO_EDGE_MAX_CALL_S``
and Triton ends the call there, so an entry whose end was never reported (a lost log line, a proxy
restart) stops counting once the call can no longer be running. Kept in this process's memory:
one control plane answers the edge (``sfumato up``); see the README for replicas.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Call:
    user_id: str
    units: int
    expires_at: float


@dataclass
class InFlightCalls:
    grace_s: float = 5.0
    _calls: dict[str, _Call] = field(default_factory=dict)

    def add(self, call_id: str, *, user_id: str, units: int, deadline_s: float) -> None:
        self._calls[call_id] = _Call(user_id, units, time.monotonic() + deadline_s + self.grace_s)

    def end(self, call_ids: list[str]) -> int:
        """Forget these calls (unknown ids are ignored); how many were in flight."""
        return sum(self._calls.pop(call_id, None) is not None for call_id in call_ids)

    def count(self, user_id: str) -> int:
        """Units of work in flight for ``user_id`` (expired entries are dropped first)."""
        now = time.monotonic()
        for call_id in [k for k, c in self._calls.items() if c.expires_at <= now]:
            del self._calls[call_id]
        return sum(c.units for c in self._calls.values() if c.user_id == user_id)

    def __len__(self) -> int:
        return len(self._calls)
