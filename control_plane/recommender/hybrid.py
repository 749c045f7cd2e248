"""The hybrid recommender: ALS on weighted implicit feedback, content similarity from the served
text encoder's prompt embeddings, time-decayed popularity, and a diversity step.

Everything here works on integer indices and numpy arrays; the control plane
(:mod:`sfumato.control_plane.recommendations`) maps its ids in and out, the offline evaluation
(:mod:`.evaluation`) and the scale benchmark call it directly.

* **Weights.** Each interaction adds :func:`interaction_weight` to its (user, item) cell: a like
  4, a download or share 3, a view 1, a rating ``2 * (rating - 3)``, a dismissed recommendation
  -1, a dislike -4. Cells are summed and clipped to [-8, 8].
* **ALS** (``implicit.cpu.als.AlternatingLeastSquares``): confidence ``alpha * |w|`` with
  preference 1 for positive cells and 0 for negative ones (``implicit`` treats negative values
  in the matrix exactly so). A user who is new since the fit is folded in with the same normal
  equations (:meth:`Model.fold_in`).
* **Content**: a user's taste vector is the weighted mean of the L2-normalised embeddings of
  the items they interacted with (dislikes subtract), plus the embedding of their favourite
  tags; an item's score is its cosine with that vector. New items score at once.
* **Popularity**: positive weight summed with an exponential time decay (half-life
  ``half_life_days``), log-scaled.
* **Hybrid**: each part is standardised over the candidate items, then mixed with weights that
  move from popularity and content (cold users) to ALS as a user's history grows
  (:func:`mix_weights`). Items the user interacted with and their own items are never returned.
* **Diversity**: maximal marginal relevance over the embeddings (``lambda_`` 0.75) among the
  top ``candidates * k``; beyond :data:`MAX_COPIES` near-copies of one another (cosine >
  :data:`NEAR_COPY`: the same prompt in other words), a further one comes after every other
  candidate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

REASONS = ("liked by people like you", "similar to content you liked", "popular")
TYPE_WEIGHTS = {"view": 1.0, "like": 4.0, "download": 3.0, "share": 3.0, "dislike": -4.0, "dismiss": -1.0}
CELL_CLIP = 8.0
NEAR_COPY = 0.9  # cosine of centred prompt embeddings: the same scene in other words
MAX_COPIES = 3  # near-copies of one another in a user's list, before the rest of the candidates


def interaction_weight(kind: str, rating: int | None = None) -> float:
    if kind == "rate":
        return 2.0 * ((rating or 3) - 3)
    return TYPE_WEIGHTS[kind]


@dataclass
class Params:
    factors: int = 8
    iterations: int = 15
    regularization: float = 0.1
    alpha: float = 10.0
    half_life_days: float = 7.0
    lambda_: float = 0.75  # MMR: relevance vs. novelty
    candidates: int = 3  # MMR looks at candidates * k items
    content_weight: float = 0.8
    popularity_weight: float = 0.25  # plus 0.75 / (1 + history): cold users lean on popularity
    als_ramp: float = 3.0  # ALS reaches full weight at this many interactions
    seed: int = 0


def user_item_matrix(
    n_users: int, n_items: int, users: np.ndarray, items: np.ndarray, weights: np.ndarray
) -> sp.csr_matrix:
    """Sum of weights per (user, item), clipped to [-CELL_CLIP, CELL_CLIP]."""
    matrix = sp.csr_matrix(
        (weights.astype(np.float32), (users.astype(np.int32), items.astype(np.int32))),
        shape=(n_users, n_items),
    )
    matrix.sum_duplicates()
    np.clip(matrix.data, -CELL_CLIP, CELL_CLIP, out=matrix.data)
    return matrix


def normalise_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def embedding_mean(embeddings: np.ndarray) -> np.ndarray:
    """The mean of the items' embeddings (those that have one)."""
    present = np.linalg.norm(embeddings, axis=1) > 0
    if not present.any():
        return np.zeros(embeddings.shape[1], dtype=np.float32)
    return embeddings[present].mean(axis=0).astype(np.float32)


def centre(embeddings: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Centred, L2-normalised rows (zero rows stay zero). Every prompt embedding of a CLIP text
    encoder shares a large common direction; without centring every pair looks similar."""
    present = np.linalg.norm(embeddings, axis=1, keepdims=True) > 0
    return normalise_rows(np.where(present, embeddings - mean, 0.0))


def decayed_popularity(
    n_items: int,
    items: np.ndarray,
    weights: np.ndarray,
    times: np.ndarray,
    *,
    now: float,
    half_life_days: float,
) -> np.ndarray:
    decay = np.exp(-math.log(2) * np.maximum(now - times, 0) / (half_life_days * 86400.0))
    score = np.bincount(items, weights=np.maximum(weights, 0) * decay, minlength=n_items)
    return np.log1p(score).astype(np.float32)


@dataclass
class Model:
    """A fitted recommender: ALS factors, item embeddings (L2-normalised) and popularity."""

    version: str
    item_factors: np.ndarray  # [n_items, k]
    user_factors: np.ndarray  # [n_users, k]
    embeddings: np.ndarray  # [n_items, D], centred and L2-normalised; zeros where an item has none
    popularity: np.ndarray  # [n_items]
    embedding_mean: np.ndarray | None = None  # [D], subtracted before normalising
    params: Params = field(default_factory=Params)
    fit_s: float = 0.0
    _gram: np.ndarray | None = None

    @property
    def n_items(self) -> int:
        return self.item_factors.shape[0]

    def gram(self) -> np.ndarray:
        if self._gram is None:
            self._gram = (self.item_factors.T @ self.item_factors).astype(np.float64)
        return self._gram

    def fold_in(self, items: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """ALS user factors for a history that the fit did not see (the same normal equations)."""
        k = self.item_factors.shape[1]
        if len(items) == 0:
            return np.zeros(k, dtype=np.float32)
        y = self.item_factors[items].astype(np.float64)
        confidence = self.params.alpha * np.abs(weights)
        preference = (weights > 0).astype(np.float64)
        a = self.gram() + (y.T * confidence) @ y + self.params.regularization * np.eye(k)
        b = y.T @ ((1.0 + confidence) * preference)
        return np.linalg.solve(a, b).astype(np.float32)


def fit(
    matrix: sp.csr_matrix,
    embeddings: np.ndarray,
    popularity: np.ndarray,
    *,
    params: Params | None = None,
    version: str = "",
) -> Model:
    """ALS on ``matrix`` (users x items, summed weights) with ``implicit``."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    params = params or Params()
    started = time.perf_counter()
    with threadpool_limits(1, "blas"):  # implicit's own threads do the work; BLAS threads fight them
        als = AlternatingLeastSquares(
            factors=params.factors,
            regularization=params.regularization,
            alpha=params.alpha,
            iterations=params.iterations,
            random_state=params.seed,
        )
        als.fit(matrix.tocsr().astype(np.float32), show_progress=False)
    return Model(
        version=version or f"hybrid-als{params.factors}",
        item_factors=np.asarray(als.item_factors, dtype=np.float32),
        user_factors=np.asarray(als.user_factors, dtype=np.float32),
        embeddings=centre(embeddings, mean := embedding_mean(embeddings)),
        embedding_mean=mean,
        popularity=popularity.astype(np.float32),
        params=params,
        fit_s=time.perf_counter() - started,
    )


def mix_weights(history: np.ndarray, params: Params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ALS, content, popularity) weights per user from the length of their history."""
    n = history.astype(np.float32)
    w_als = np.minimum(1.0, n / params.als_ramp)
    w_content = np.full_like(n, params.content_weight)
    w_pop = params.popularity_weight + 0.75 / (1.0 + n)
    return w_als, w_content, w_pop


def _standardise(x: np.ndarray) -> np.ndarray:
    """Per row: zero mean, unit deviation over the items (constant rows become 0)."""
    x = np.asarray(x, dtype=np.float32)
    mean = x.mean(axis=1, keepdims=True)
    std = x.std(axis=1, keepdims=True)
    out = x - mean
    out /= np.where(std > 1e-6, std, np.inf)
    return out


@dataclass
class Ranked:
    items: np.ndarray  # [B, k] item indices (-1: none)
    scores: np.ndarray  # [B, k]
    reasons: np.ndarray  # [B, k] index into REASONS


def score_parts(
    model: Model,
    user_factors: np.ndarray,
    taste: np.ndarray,
    history: np.ndarray,
    *,
    parts: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray]:
    """Standardised (ALS ``[B, n]``, content ``[B, n]``, popularity ``[1, n]``) scores (``None``
    for a part left out) and their weighted sum ``[B, n]``."""
    b = user_factors.shape[0]
    w_als, w_content, w_pop = mix_weights(history, model.params)
    w_content = np.where(np.linalg.norm(taste, axis=1) > 0, w_content, 0.0)  # no taste yet
    total = np.zeros((b, model.n_items), dtype=np.float32)
    als = content = pop = None
    if parts[0]:
        als = _standardise(user_factors @ model.item_factors.T)
        total += als * w_als[:, None]
    if parts[1]:
        content = _standardise(taste @ model.embeddings.T)
        total += content * w_content[:, None]
    if parts[2]:
        pop = _standardise(model.popularity[None, :])
        total += pop * w_pop[:, None]
    return als, content, pop, total


def rank(
    model: Model,
    user_factors: np.ndarray,
    taste: np.ndarray,
    history: np.ndarray,
    exclude: sp.csr_matrix,
    *,
    k: int,
    parts: tuple[bool, bool, bool] = (True, True, True),
    diversify: bool = True,
) -> Ranked:
    """The top ``k`` items for a batch of users. ``exclude``: [B, n_items], nonzero = never
    recommend (seen, own, private, deleted)."""
    als, content, pop, total = score_parts(model, user_factors, taste, history, parts=parts)
    excluded = sp.csr_matrix(exclude)
    rows_of = np.repeat(np.arange(excluded.shape[0]), np.diff(excluded.indptr))
    total[rows_of, excluded.indices] = -np.inf
    b, n = total.shape
    m = min(n, k * model.params.candidates if diversify else k)
    top = np.argpartition(total, n - m, axis=1)[:, n - m :] if m < n else np.tile(np.arange(n), (b, 1))
    top_scores = np.take_along_axis(total, top, axis=1)
    order = np.argsort(-top_scores, axis=1)
    top = np.take_along_axis(top, order, axis=1)
    top_scores = np.take_along_axis(top_scores, order, axis=1)
    if diversify and m > k:
        picked = _mmr(model.embeddings, top, top_scores, k=k, lambda_=model.params.lambda_)
    else:
        picked = np.tile(np.arange(min(k, m)), (b, 1))
    items = np.take_along_axis(top, picked, axis=1)
    scores = np.take_along_axis(top_scores, picked, axis=1)
    w_als, w_content, w_pop = mix_weights(history, model.params)
    zero = np.zeros(items.shape, dtype=np.float32)
    contributions = np.stack(
        [
            np.take_along_axis(als, items, axis=1) * w_als[:, None] if als is not None else zero - np.inf,
            np.take_along_axis(content, items, axis=1) * w_content[:, None]
            if content is not None
            else zero - np.inf,
            pop[0, items] * w_pop[:, None] if pop is not None else zero - np.inf,
        ],
        axis=-1,
    )  # [B, k, 3]
    reasons = np.argmax(contributions, axis=-1)
    items = np.where(np.isfinite(scores), items, -1)
    return Ranked(items=items, scores=np.where(np.isfinite(scores), scores, 0.0), reasons=reasons)


def _mmr(
    embeddings: np.ndarray, top: np.ndarray, scores: np.ndarray, *, k: int, lambda_: float
) -> np.ndarray:
    """Greedy maximal marginal relevance, vectorised over the batch: positions into ``top``. A
    candidate with :data:`MAX_COPIES` near-copies (cosine above :data:`NEAR_COPY`) picked already
    goes after every other candidate, however high it scores."""
    b, m = top.shape
    finite = np.isfinite(scores)
    low = np.where(finite, scores, np.inf).min(axis=1, keepdims=True)
    high = np.where(finite, scores, -np.inf).max(axis=1, keepdims=True)
    rel = np.where(finite, (scores - low) / np.maximum(high - low, 1e-6), -1e9)
    vectors = embeddings[top]  # [B, m, D]
    sims = vectors @ vectors.transpose(0, 2, 1)  # [B, m, m]
    chosen = np.zeros((b, k), dtype=np.int64)
    taken = np.zeros((b, m), dtype=bool)
    max_sim = np.zeros((b, m), dtype=np.float32)
    copies = np.zeros((b, m), dtype=np.int32)  # picked near-copies of each candidate
    rows = np.arange(b)
    for step in range(k):
        value = lambda_ * rel - (1 - lambda_) * max_sim - (copies >= MAX_COPIES)  # a 4th copy goes last
        value[taken] = -np.inf
        pick = np.argmax(value, axis=1)
        chosen[:, step] = pick
        taken[rows, pick] = True
        max_sim = np.maximum(max_sim, sims[rows, pick])
        copies += sims[rows, pick] > NEAR_COPY
    return chosen


def tastes(model: Model, matrix: sp.csr_matrix, preferences: np.ndarray | None = None) -> np.ndarray:
    """Users' taste vectors: weighted means of their items' (centred, normalised) embeddings, plus
    the embedding of their favourite tags (``preferences``, raw, zero rows where none)."""
    taste = normalise_rows(np.asarray(matrix @ model.embeddings, dtype=np.float32))
    if preferences is not None and model.embedding_mean is not None:
        taste = taste + 0.5 * centre(preferences, model.embedding_mean)
    return normalise_rows(taste)
