"""The hybrid recommender's algorithms (no database, no Triton): ranking rules, the diversity
step, the ALS fold-in, and ``sfumato recommend evaluate`` end to end on a small community."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from sfumato.control_plane.recommender import hybrid

ROOT = Path(__file__).resolve().parent.parent


def community(seed: int = 0):
    """40 users in two camps over 30 items: camp A likes items 0-14, camp B items 15-29."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(40):
        pool = np.arange(15) if u < 20 else np.arange(15, 30)
        for i in rng.choice(pool, size=8, replace=False):
            users.append(u)
            items.append(i)
    weights = np.full(len(users), 4.0, dtype=np.float32)
    matrix = hybrid.user_item_matrix(40, 30, np.array(users), np.array(items), weights)
    embeddings = np.zeros((30, 8), dtype=np.float32)
    embeddings[:15, 0] = 1.0
    embeddings[15:, 1] = 1.0
    embeddings += 0.01 * rng.normal(size=embeddings.shape).astype(np.float32)
    popularity = hybrid.decayed_popularity(
        30, np.array(items), weights, np.zeros(len(items)), now=0.0, half_life_days=7
    )
    return matrix, embeddings, popularity


def test_weights() -> None:
    assert hybrid.interaction_weight("like") == 4 and hybrid.interaction_weight("dislike") == -4
    assert hybrid.interaction_weight("rate", 5) == 4 and hybrid.interaction_weight("rate", 1) == -4
    m = hybrid.user_item_matrix(1, 2, np.array([0, 0, 0]), np.array([0, 0, 1]), np.array([4.0, 4.0, 9.0]))
    assert m.toarray().tolist() == [[8.0, 8.0]]  # summed, clipped


def test_ranking_follows_the_camp_and_never_returns_seen_or_excluded_items() -> None:
    matrix, embeddings, popularity = community()
    model = hybrid.fit(matrix, embeddings, popularity, params=hybrid.Params(factors=4, iterations=10))
    users = np.arange(40)
    exclude = (abs(matrix) > 0).astype(np.float32).tolil()
    exclude[0, 14] = 1.0  # e.g. user 0's own item
    taste = hybrid.tastes(model, matrix)
    ranked = hybrid.rank(model, model.user_factors, taste, np.diff(matrix.indptr), exclude.tocsr(), k=5)
    for u in users:
        row = ranked.items[u]
        seen = set(matrix[u].indices)
        assert not seen & set(row.tolist())
        camp = range(15) if u < 20 else range(15, 30)
        assert all(i in camp for i in row[:3]), (u, row)
    assert 14 not in ranked.items[0]
    assert set(np.unique(ranked.reasons)) <= {0, 1, 2}


def test_a_user_with_no_history_gets_popular_items() -> None:
    matrix, embeddings, popularity = community()
    model = hybrid.fit(matrix, embeddings, popularity, params=hybrid.Params(factors=4))
    ranked = hybrid.rank(
        model,
        np.zeros((1, 4), dtype=np.float32),
        np.zeros((1, 8), dtype=np.float32),
        np.zeros(1, dtype=np.int64),
        sp.csr_matrix((1, 30)),
        k=3,
        diversify=False,
    )
    third = np.sort(popularity)[-3]
    assert all(popularity[i] >= third for i in ranked.items[0]) and all(ranked.reasons[0] == 2)


def test_the_diversity_step_breaks_up_near_copies() -> None:
    """Ten near-identical items score highest; with the diversity step at most three of them are
    in the top 6."""
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(40, 16)).astype(np.float32)
    embeddings[:10] = embeddings[0] + 0.001 * rng.normal(size=(10, 16)).astype(np.float32)
    popularity = np.linspace(1, 0, 40).astype(np.float32)
    popularity[:10] += 5.0
    model = hybrid.Model(
        version="t",
        item_factors=np.zeros((40, 2), dtype=np.float32),
        user_factors=np.zeros((1, 2), dtype=np.float32),
        embeddings=hybrid.centre(embeddings, hybrid.embedding_mean(embeddings)),
        embedding_mean=hybrid.embedding_mean(embeddings),
        popularity=popularity,
        params=hybrid.Params(candidates=4),
    )
    args = (
        model,
        np.zeros((1, 2), np.float32),
        np.zeros((1, 16), np.float32),
        np.zeros(1),
        sp.csr_matrix((1, 40)),
    )
    plain = hybrid.rank(*args, k=6, diversify=False).items[0]
    diverse = hybrid.rank(*args, k=6, diversify=True).items[0]
    assert all(i < 10 for i in plain)
    assert sum(i < 10 for i in diverse) == hybrid.MAX_COPIES and diverse[0] < 10


def test_fold_in_matches_the_fitted_user_factors() -> None:
    matrix, embeddings, popularity = community()
    model = hybrid.fit(matrix, embeddings, popularity, params=hybrid.Params(factors=4, iterations=30))
    for u in (0, 25):
        row = matrix[u]
        folded = model.fold_in(row.indices, row.data)
        fitted = model.user_factors[u]
        cos = folded @ fitted / (np.linalg.norm(folded) * np.linalg.norm(fitted))
        assert cos > 0.95, (u, cos)


def test_recommend_evaluate_command(tmp_path: Path, exported_repo: Path) -> None:
    out = tmp_path / "eval.json"
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "sfumato"),
            "recommend",
            "evaluate",
            "--users",
            "300",
            "--items",
            "120",
            "--seeds",
            "0",
            "--repository",
            str(exported_repo),
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "eval.png"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "hybrid / popularity recall@10" in done.stdout
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"popularity", "als", "content", "hybrid (no diversity)", "hybrid"}
    for metrics in report["results"].values():
        assert 0 <= metrics["recall@10"] <= 1 and 0 <= metrics["ndcg@10"] <= metrics["recall@10"]
    assert (tmp_path / "eval.png").stat().st_size > 0
