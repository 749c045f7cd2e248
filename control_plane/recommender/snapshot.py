"""The fitted recommender a process holds (:attr:`Services.recommender`): the model and the
content ids of its rows. Replaced whole on every refit; readers take a reference."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime

from sfumato.control_plane.recommender.hybrid import Model


@dataclass
class Fitted:
    model: Model
    item_ids: list[str]
    index: dict[str, int]
    fitted_at: datetime
    interactions: int


@dataclass
class RecommenderCache:
    fitted: Fitted | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one refit at a time per process
