"""Recommendations: the refit (fit the hybrid, refresh every user's rows), the per-user refresh
of stale rows, serving the precomputed rows, and feedback.

* :func:`refit` loads public content and every interaction, fills in embeddings that publish
  could not make (Triton was down), fits :mod:`.recommender.hybrid` in a worker thread, keeps
  the model in :attr:`Services.recommender`, and rewrites the rows of every user who has a
  history or preferences (in batches, one transaction each). It runs on a schedule
  (:func:`run_refits`, every ``SFUMATO_RECOMMEND_REFIT_INTERVAL_S``) and on
  ``POST /v1/recommendations/generate``.
* A user's rows are *stale* once they interact or change preferences after the rows were made
  (``recommender_users.changed_at > computed_at``). :func:`list_recommendations` serves fresh
  rows with one indexed read; stale or missing ones are recomputed for that user first, against
  the fitted model (ALS fold-in of their current history, their taste vector, items published
  since the fit appended with their embeddings), so a new user sees recommendations after their
  first likes and new items are recommendable at once.
* :func:`feedback` stores ``clicked`` / ``dismissed`` / ``liked`` on the row and records it as an
  interaction (``view`` / ``dismiss`` / ``like``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import time
from array import array
from dataclasses import asdict, dataclass, replace
from datetime import datetime

import numpy as np
import scipy.sparse as sp
from sqlalchemy import delete, insert, or_, select, update
from sqlalchemy.orm import defer

from sfumato.control_plane import interactions
from sfumato.control_plane.auth import Principal
from sfumato.control_plane.models import (
    ContentItem,
    Interaction,
    Profile,
    Recommendation,
    RecommenderState,
    new_id,
    utcnow,
)
from sfumato.control_plane.recommender import hybrid
from sfumato.control_plane.recommender.snapshot import Fitted
from sfumato.control_plane.services import Services
from sfumato.errors import NotFoundError

log = logging.getLogger("sfumato.recommendations")
FEEDBACK_INTERACTION = {"clicked": "view", "dismissed": "dismiss", "liked": "like"}
REFRESH_BATCH = 256
EMBED_BACKFILL = 512


@dataclass(frozen=True, slots=True)
class RefitReport:
    algorithm: str
    users: int
    items: int
    interactions: int
    load_s: float  # reading content and interactions from the database (and embedding backfill)
    fit_s: float
    refresh_s: float  # ranking every user and writing their rows


def _vector(data: bytes | None, dim: int) -> np.ndarray:
    if data is None:
        return np.zeros(dim, dtype=np.float32)
    v = np.frombuffer(data, dtype=np.float32)
    return v if v.shape[0] == dim else np.zeros(dim, dtype=np.float32)


async def _backfill_embeddings(services: Services) -> int:
    """Embed public items published while Triton was unreachable; how many were filled in."""
    async with services.read_sessions() as session:
        rows = (
            await session.execute(
                select(ContentItem.id, ContentItem.prompt)
                .where(ContentItem.embedding.is_(None), ContentItem.prompt != "")
                .limit(EMBED_BACKFILL)
            )
        ).all()
    if not rows:
        return 0
    try:
        vectors = await services.triton.embed_prompts([r.prompt for r in rows])
    except Exception as error:  # Triton down: the next refit tries again
        log.warning("embedding backfill skipped: %s", error)
        return 0
    async with services.sessions() as session:
        for row, vector in zip(rows, vectors, strict=True):
            await session.execute(
                update(ContentItem)
                .where(ContentItem.id == row.id)
                .values(embedding=vector.astype(np.float32).tobytes())
            )
        await session.commit()
    return len(rows)


@dataclass
class _Data:
    item_ids: list[str]
    creators: list[str]
    embeddings: np.ndarray
    user_ids: list[str]
    users: np.ndarray
    items: np.ndarray
    weights: np.ndarray
    times: np.ndarray
    preferences: dict[str, bytes]


LOAD_CHUNK = 50_000  # interactions per fetch: the refit never holds them all as Python rows


async def _load(services: Services) -> _Data:
    """Public items, every interaction (streamed in chunks into compact arrays), preferences."""
    async with services.read_sessions() as session:
        items = (
            await session.execute(
                select(ContentItem.id, ContentItem.creator_id, ContentItem.embedding)
                .where(ContentItem.visibility == "public")
                .order_by(ContentItem.created_at, ContentItem.id)
            )
        ).all()
        index = {r.id: i for i, r in enumerate(items)}
        prefs = (
            await session.execute(
                select(Profile.user_id, Profile.preference_embedding).where(
                    Profile.preference_embedding.is_not(None)
                )
            )
        ).all()
        user_ids: dict[str, int] = {}
        for uid in (await session.scalars(select(RecommenderState.user_id))).all():
            user_ids.setdefault(uid, len(user_ids))
        for p in prefs:
            user_ids.setdefault(p.user_id, len(user_ids))
        users, kept_items = array("q"), array("q")
        weights, times = array("f"), array("d")
        weight_of: dict[tuple[str, int | None], float] = {}
        stream = await session.stream(
            select(
                Interaction.user_id,
                Interaction.content_id,
                Interaction.type,
                Interaction.rating,
                Interaction.created_at,
            ).execution_options(yield_per=LOAD_CHUNK)
        )
        async for chunk in stream.partitions(LOAD_CHUNK):
            for user_id, content_id, kind, rating, created_at in chunk:
                item = index.get(content_id)
                if item is None:  # private or deleted meanwhile
                    continue
                key = (kind, rating)
                if key not in weight_of:
                    weight_of[key] = hybrid.interaction_weight(kind, rating)
                users.append(user_ids.setdefault(user_id, len(user_ids)))
                kept_items.append(item)
                weights.append(weight_of[key])
                times.append(created_at.timestamp())
    dim = next((len(r.embedding) // 4 for r in items if r.embedding), 0) or 1
    return _Data(
        item_ids=[r.id for r in items],
        creators=[r.creator_id for r in items],
        embeddings=np.stack([_vector(r.embedding, dim) for r in items]) if items else np.zeros((0, dim)),
        user_ids=list(user_ids),
        users=np.frombuffer(users, dtype=np.int64),
        items=np.frombuffer(kept_items, dtype=np.int64),
        weights=np.frombuffer(weights, dtype=np.float32),
        times=np.frombuffer(times, dtype=np.float64),
        preferences={p.user_id: p.preference_embedding for p in prefs},
    )


def _fit(data: _Data, *, version: str) -> tuple[hybrid.Model, sp.csr_matrix]:
    n_users, n_items = len(data.user_ids), len(data.item_ids)
    matrix = hybrid.user_item_matrix(n_users, n_items, data.users, data.items, data.weights)
    popularity = hybrid.decayed_popularity(
        n_items, data.items, data.weights, data.times, now=time.time(), half_life_days=7
    )
    model = hybrid.fit(matrix, data.embeddings, popularity, version=version)
    return model, matrix


def _exclusions(rows: list[int], matrix: sp.csr_matrix, own: list[np.ndarray]) -> sp.csr_matrix:
    seen = (abs(matrix[rows]) > 0).astype(np.float32).tolil()
    for j, items in enumerate(own):
        if len(items):
            seen[j, items] = 1.0
    return seen.tocsr()


def _rank_users(
    model: hybrid.Model,
    matrix: sp.csr_matrix,
    rows: list[int],
    user_factors: np.ndarray,
    preferences: np.ndarray,
    own: list[np.ndarray],
    k: int,
) -> hybrid.Ranked:
    sub = matrix[rows]
    history = np.diff(sub.indptr)
    taste = hybrid.tastes(model, sub, preferences)
    return hybrid.rank(model, user_factors, taste, history, _exclusions(rows, matrix, own), k=k)


def _rows_for(user_id: str, ranked: hybrid.Ranked, j: int, item_ids: list[str], algorithm: str) -> list[dict]:
    out = []
    for item, score, reason in zip(ranked.items[j], ranked.scores[j], ranked.reasons[j], strict=True):
        if item < 0:
            break
        out.append(
            {
                "user_id": user_id,
                "content_id": item_ids[item],
                "score": float(score),
                "reason": hybrid.REASONS[int(reason)],
                "algorithm": algorithm,
            }
        )
    return out


async def _write_rows(
    services: Services, rows_by_user: dict[str, list[dict]], algorithm: str, *, as_of: datetime
) -> None:
    """Replace these users' rows, in one transaction. ``as_of``: when the data they were computed
    from was read (an interaction after it leaves the rows stale)."""
    from sfumato.control_plane.worker import run_to_completion

    async def write() -> None:
        async with services.sessions() as session:
            users = list(rows_by_user)
            # Only items that still exist and are public (deleted or made private meanwhile: dropped).
            wanted = list({row["content_id"] for rows in rows_by_user.values() for row in rows})
            present: set[str] = set()
            for start in range(0, len(wanted), 5000):
                present.update(
                    (
                        await session.scalars(
                            select(ContentItem.id).where(
                                ContentItem.id.in_(wanted[start : start + 5000]),
                                ContentItem.visibility == "public",
                            )
                        )
                    ).all()
                )
            await session.execute(delete(Recommendation).where(Recommendation.user_id.in_(users)))
            now = utcnow()
            values = []
            for rows in rows_by_user.values():
                kept = [row for row in rows if row["content_id"] in present]
                values += [
                    {**row, "id": new_id(), "rank": rank, "created_at": now} for rank, row in enumerate(kept)
                ]
            for start in range(0, len(values), 2000):
                await session.execute(insert(Recommendation), values[start : start + 2000])
            known = set(
                (
                    await session.scalars(
                        select(RecommenderState.user_id).where(RecommenderState.user_id.in_(users))
                    )
                ).all()
            )
            await session.execute(
                update(RecommenderState)
                .where(RecommenderState.user_id.in_(known))
                .values(computed_at=as_of, algorithm=algorithm)
                .execution_options(synchronize_session=False)
            )
            fresh = [u for u in users if u not in known]
            if fresh:
                await session.execute(
                    insert(RecommenderState),
                    [
                        {"user_id": u, "computed_at": as_of, "changed_at": as_of, "algorithm": algorithm}
                        for u in fresh
                    ],
                )
            await session.commit()

    await run_to_completion(write())


MODEL_KEY = "recommender/model.npz"  # the last fitted model, in the object store


def _dump(fitted: Fitted) -> bytes:
    model = fitted.model
    meta = {
        "version": model.version,
        "fitted_at": fitted.fitted_at.isoformat(),
        "interactions": fitted.interactions,
        "params": asdict(model.params),
        "fit_s": model.fit_s,
    }
    buffer = io.BytesIO()
    np.savez(
        buffer,
        item_factors=model.item_factors,
        embeddings=model.embeddings,
        embedding_mean=model.embedding_mean if model.embedding_mean is not None else np.zeros(0),
        popularity=model.popularity,
        item_ids=np.array(fitted.item_ids),
        meta=np.array(json.dumps(meta)),
    )
    return buffer.getvalue()


def _restore(data: bytes) -> Fitted:
    with np.load(io.BytesIO(data)) as arrays:
        meta = json.loads(str(arrays["meta"]))
        item_ids = [str(i) for i in arrays["item_ids"]]
        model = hybrid.Model(
            version=meta["version"],
            item_factors=arrays["item_factors"],
            user_factors=np.zeros((0, arrays["item_factors"].shape[1]), dtype=np.float32),
            embeddings=arrays["embeddings"],
            embedding_mean=arrays["embedding_mean"] if arrays["embedding_mean"].size else None,
            popularity=arrays["popularity"],
            params=hybrid.Params(**meta["params"]),
            fit_s=meta["fit_s"],
        )
    return Fitted(
        model=model,
        item_ids=item_ids,
        index={item_id: i for i, item_id in enumerate(item_ids)},
        fitted_at=datetime.fromisoformat(meta["fitted_at"]),
        interactions=meta["interactions"],
    )


async def fitted_model(*, services: Services) -> Fitted | None:
    """This process's fitted model: in memory, else the last one any process saved in the object
    store, else fitted now (a first start). ``None`` while there is no public content."""
    cache = services.recommender
    if cache.fitted is not None:
        return cache.fitted
    async with cache.lock:
        if cache.fitted is None:
            try:
                cache.fitted = await asyncio.to_thread(_restore, await services.store.get(MODEL_KEY))
            except FileNotFoundError:
                await _refit(services)
        return cache.fitted


async def refit(*, services: Services) -> RefitReport:
    """Fit the hybrid on everything and rewrite every known user's rows (one refit at a time in a
    process)."""
    async with services.recommender.lock:
        return await _refit(services)


async def _refit(services: Services) -> RefitReport:
    cache = services.recommender
    load_started = time.perf_counter()
    await _backfill_embeddings(services)
    started_at = utcnow()
    data = await _load(services)
    load_s = time.perf_counter() - load_started
    algorithm = f"hybrid-als{hybrid.Params().factors}-te@{started_at.strftime('%Y%m%dT%H%M%S')}"
    if not data.item_ids:
        cache.fitted = None
        return RefitReport(algorithm, len(data.user_ids), 0, 0, load_s, 0.0, 0.0)
    model, matrix = await asyncio.to_thread(_fit, data, version=algorithm)
    index = {item_id: i for i, item_id in enumerate(data.item_ids)}
    cache.fitted = Fitted(
        model=model,
        item_ids=data.item_ids,
        index=index,
        fitted_at=started_at,
        interactions=len(data.users),
    )
    await services.store.put(MODEL_KEY, await asyncio.to_thread(_dump, cache.fitted))
    refresh_started = time.perf_counter()
    creators = np.array(data.creators)
    k = services.settings.recommend_rows
    dim = data.embeddings.shape[1]
    for start in range(0, len(data.user_ids), REFRESH_BATCH):
        batch = list(range(start, min(start + REFRESH_BATCH, len(data.user_ids))))
        users = [data.user_ids[i] for i in batch]
        prefs = np.stack([_vector(data.preferences.get(u), dim) for u in users])
        own = [np.flatnonzero(creators == u) for u in users]
        ranked = await asyncio.to_thread(
            _rank_users, model, matrix, batch, model.user_factors[batch], prefs, own, k
        )
        await _write_rows(
            services,
            {u: _rows_for(u, ranked, j, data.item_ids, algorithm) for j, u in enumerate(users)},
            algorithm,
            as_of=started_at,
        )
    return RefitReport(
        algorithm=algorithm,
        users=len(data.user_ids),
        items=len(data.item_ids),
        interactions=len(data.users),
        load_s=load_s,
        fit_s=model.fit_s,
        refresh_s=time.perf_counter() - refresh_started,
    )


async def refresh_user(*, services: Services, user_id: str) -> None:
    """Recompute one user's rows against the fitted model (:func:`fitted_model`): their current
    history folded in, items published since the fit included."""
    fitted = await fitted_model(services=services)
    if fitted is None:
        return
    as_of = utcnow()
    async with services.read_sessions() as session:
        history = (
            await session.execute(
                select(Interaction.content_id, Interaction.type, Interaction.rating).where(
                    Interaction.user_id == user_id
                )
            )
        ).all()
        newer = (
            await session.execute(
                select(ContentItem.id, ContentItem.embedding, ContentItem.creator_id).where(
                    ContentItem.visibility == "public",
                    ContentItem.created_at >= fitted.fitted_at,
                )
            )
        ).all()
        pref = await session.scalar(select(Profile.preference_embedding).where(Profile.user_id == user_id))
        own = set(
            (await session.scalars(select(ContentItem.id).where(ContentItem.creator_id == user_id))).all()
        )
    model, item_ids = fitted.model, list(fitted.item_ids)
    extra = [r for r in newer if r.id not in fitted.index]
    if extra:
        dim = model.embeddings.shape[1]
        raw = np.stack([_vector(r.embedding, dim) for r in extra])
        model = replace(
            model,
            item_factors=np.vstack(
                [model.item_factors, np.zeros((len(extra), model.item_factors.shape[1]))]
            ).astype(np.float32),
            embeddings=np.vstack([model.embeddings, hybrid.centre(raw, model.embedding_mean)]),
            popularity=np.concatenate([model.popularity, np.zeros(len(extra), dtype=np.float32)]),
            _gram=model._gram,
        )
        item_ids += [r.id for r in extra]
    index = {item_id: i for i, item_id in enumerate(item_ids)}
    known = [
        (index[r.content_id], hybrid.interaction_weight(r.type, r.rating))
        for r in history
        if r.content_id in index
    ]
    items = np.array([i for i, _ in known], dtype=np.int64)
    weights = np.array([w for _, w in known], dtype=np.float32)
    matrix = hybrid.user_item_matrix(1, len(item_ids), np.zeros(len(items), dtype=np.int64), items, weights)
    blocked = [index[i] for i in own if i in index]
    dim = model.embeddings.shape[1]
    factors = model.fold_in(matrix.indices, matrix.data)[None, :]
    ranked = await asyncio.to_thread(
        _rank_users,
        model,
        matrix,
        [0],
        factors,
        _vector(pref, dim)[None, :],
        [np.array(blocked, dtype=np.int64)],
        services.settings.recommend_rows,
    )
    await _write_rows(
        services,
        {user_id: _rows_for(user_id, ranked, 0, item_ids, model.version)},
        model.version,
        as_of=as_of,
    )


async def list_recommendations(
    *, session, services: Services, principal: Principal, user_id: str, limit: int
) -> tuple[list[tuple[Recommendation, ContentItem]], RecommenderState | None]:
    """The user's top ``limit`` rows, recomputed first if stale (``session``: read-only is fine)."""
    from sfumato.control_plane.users import resolve

    target = resolve(principal, user_id)
    for attempt in range(2):
        state = await session.get(RecommenderState, target, populate_existing=True)
        stale = state is None or state.computed_at is None or state.changed_at > state.computed_at
        if stale and attempt == 0:
            await session.commit()
            await refresh_user(services=services, user_id=target)
            continue
        rows = (
            await session.execute(
                select(Recommendation, ContentItem)
                .join(ContentItem, ContentItem.id == Recommendation.content_id)
                .where(
                    Recommendation.user_id == target,
                    Recommendation.feedback.is_(None),
                    or_(ContentItem.visibility == "public", ContentItem.creator_id == target),
                )
                .order_by(Recommendation.rank)
                .limit(limit)
                .options(defer(ContentItem.embedding))  # 256+ bytes per item the page never shows
            )
        ).all()
        await session.commit()
        return [(r, c) for r, c in rows], state
    raise AssertionError("unreachable")


async def feedback(*, session, principal: Principal, recommendation_id: str, kind: str) -> Recommendation:
    """Store feedback on one of the caller's recommendations and count it as an interaction."""
    row = await session.get(Recommendation, recommendation_id)
    if row is None or row.user_id != principal.user_id:
        raise NotFoundError(f"no recommendation {recommendation_id}")
    row.feedback, row.feedback_at = kind, utcnow()
    await interactions.record(
        session,
        principal=principal,
        content_id=row.content_id,
        kind=FEEDBACK_INTERACTION[kind],
        recommendation_id=row.id,
    )
    await session.commit()
    return row


async def run_refits(services: Services, *, stop: asyncio.Event) -> None:
    """Refit every ``SFUMATO_RECOMMEND_REFIT_INTERVAL_S`` (the first after one interval) until
    ``stop`` is set or the task is cancelled; a failed round is logged and tried next time."""
    interval = services.settings.recommend_refit_interval_s
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()
        if stop.is_set():
            return
        try:
            report = await refit(services=services)
            log.info(
                "recommender refitted: %s, %d users, %d items, %d interactions, fit %.2f s, rows %.2f s",
                report.algorithm,
                report.users,
                report.items,
                report.interactions,
                report.fit_s,
                report.refresh_s,
            )
        except Exception:
            log.exception("recommender refit failed; retrying in %.0f s", interval)
