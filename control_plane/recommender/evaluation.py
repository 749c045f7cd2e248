"""Offline evaluation of the recommender on a seeded synthetic community (``sfumato recommend
evaluate``).

* **Content**: ``items`` prompts from the demo model's caption space (a colour x shape x
  background scene, written in one of the forms people type: :func:`sfumato.shapes.paraphrase`),
  so several items show the same scene in other words (near-copies for the diversity step).
  Each item has a hidden intrinsic appeal (Zipf), which makes some items popular.
* **Users** have hidden tastes: a Dirichlet preference over colours, shapes and backgrounds
  (concentrated: most people care for one or two colours). Their activity is log-normal, so
  about a third of them have 3 interactions or fewer.
* **Interactions**: each user draws distinct items in time order; with probability ``noise``
  by appeal alone (what is in front of everyone), otherwise in proportion to
  ``exp(affinity / T) * appeal ** bias``. The type follows the affinity: a like, download or
  share when the item is to their taste, a view when it is lukewarm, a dislike when it is not.
* **Split**: leave-last-out by time: each user's last positive interaction (like, download,
  share) is held out, everything before it is training. Users with no positive interaction
  before it are left out of the test (they still train).
* **Metrics**: recall@10 and NDCG@10 over the full ranking of every item the user has not
  interacted with in training (no sampled negatives), overall and on cold-start users
  (3 training interactions or fewer); and ``copies@10``, the mean size of the largest group of
  near-copies (the same scene in other words) in a top 10, which the diversity step caps.

The prompt embeddings are the demo model's text encoder's pooled output, computed in-process
with ONNX Runtime from the exported ``model_repository`` (the same ONNX file Triton serves), so
the evaluation needs no running Triton.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sfumato import shapes
from sfumato.control_plane.recommender import hybrid

ALGORITHMS: dict[str, dict] = {
    "popularity": {"parts": (False, False, True), "diversify": False},
    "als": {"parts": (True, False, False), "diversify": False},
    "content": {"parts": (False, True, False), "diversify": False},
    "hybrid (no diversity)": {"parts": (True, True, True), "diversify": False},
    "hybrid": {"parts": (True, True, True), "diversify": True},
}
COLD_MAX = 3
K = 10


@dataclass
class Community:
    users: np.ndarray
    items: np.ndarray
    kinds: list[str]
    weights: np.ndarray
    times: np.ndarray
    prompts: list[str]
    n_users: int


def synthetic_community(
    *,
    n_users: int = 2000,
    n_items: int = 800,
    seed: int = 0,
    noise: float = 0.25,
    bias: float = 0.5,
    temperature: float = 0.15,
) -> Community:
    rng = np.random.default_rng(seed)
    scenes = shapes.all_scenes()
    item_scene = rng.integers(len(scenes), size=n_items)
    prompts = [
        shapes.paraphrase(scenes[i], rng, background=bool(rng.random() < 0.85)).text for i in item_scene
    ]
    colour_of = np.array([shapes.COLOURS.index(scenes[i].colour) for i in item_scene])
    shape_of = np.array([shapes.SHAPES.index(scenes[i].shape) for i in item_scene])
    bg_of = np.array([shapes.COLOURS.index(scenes[i].background) for i in item_scene])
    appeal = 1.0 / (1.0 + rng.permutation(n_items)) ** 0.8
    appeal /= appeal.sum()

    taste_colour = rng.dirichlet(np.full(len(shapes.COLOURS), 0.3), size=n_users)
    taste_shape = rng.dirichlet(np.full(len(shapes.SHAPES), 0.5), size=n_users)
    taste_bg = rng.dirichlet(np.full(len(shapes.COLOURS), 0.5), size=n_users)
    affinity = (
        taste_colour[:, colour_of] / taste_colour.max(axis=1, keepdims=True)
        + taste_shape[:, shape_of] / taste_shape.max(axis=1, keepdims=True)
        + taste_bg[:, bg_of] / taste_bg.max(axis=1, keepdims=True)
    ) / 3  # [users, items] in [0, 1]
    activity = np.clip(np.round(rng.lognormal(mean=1.7, sigma=0.9, size=n_users)), 2, 80).astype(int)

    users, items, kinds, times = [], [], [], []
    now = 1.8e9
    for u in range(n_users):
        n = activity[u]
        p_taste = np.exp(affinity[u] / temperature) * appeal**bias
        p_taste /= p_taste.sum()
        p = (1 - noise) * p_taste + noise * appeal
        chosen = rng.choice(n_items, size=n, replace=False, p=p)
        start = now - rng.uniform(5, 60) * 86400
        stamps = np.sort(start + rng.uniform(0, now - start, size=n))
        for item, stamp in zip(chosen, stamps, strict=True):
            a = affinity[u, item] + rng.normal(0, 0.08)
            if a > 0.6:
                kind = str(rng.choice(["like", "like", "like", "download", "share"]))
            elif a > 0.35:
                kind = "view"
            else:
                kind = "dislike" if rng.random() < 0.5 else "view"
            users.append(u)
            items.append(int(item))
            kinds.append(kind)
            times.append(stamp)
    weights = np.array([hybrid.interaction_weight(k) for k in kinds], dtype=np.float32)
    return Community(
        users=np.array(users),
        items=np.array(items),
        kinds=kinds,
        weights=weights,
        times=np.array(times),
        prompts=prompts,
        n_users=n_users,
    )


def leave_last_out(c: Community) -> tuple[np.ndarray, dict[int, int]]:
    """A boolean training mask and {user: held-out item}: each user's last positive interaction."""
    train = np.ones(len(c.users), dtype=bool)
    held: dict[int, int] = {}
    order = np.lexsort((c.times, c.users))
    last_positive: dict[int, int] = {}
    for row in order:
        if c.weights[row] > 1:
            last_positive[int(c.users[row])] = int(row)
    for user, row in last_positive.items():
        train[row] = False
        # later interactions than the held-out one are not training either (time order)
        later = (c.users == user) & (c.times > c.times[row])
        train[later] = False
        held[user] = int(c.items[row])
    positives_before = np.bincount(c.users[train & (c.weights > 1)], minlength=c.n_users)
    held = {u: i for u, i in held.items() if positives_before[u] >= 1}
    return train, held


def text_encoder_embeddings(prompts: list[str], repository: Path) -> np.ndarray:
    """The pooled output of the exported text encoder (ONNX Runtime, in-process)."""
    import onnxruntime as ort

    from sfumato.serving.tokenizer import PromptTokenizer

    tokenizer = PromptTokenizer(repository / "pipeline" / "1" / "assets" / "tokenizer.json")
    session = ort.InferenceSession(
        str(repository / "text_encoder" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    out = []
    for start in range(0, len(prompts), 256):
        ids = tokenizer(prompts[start : start + 256])
        out.append(session.run(["pooler_output"], {"input_ids": ids})[0])
    assert "pooler_output" in names
    return np.concatenate(out).astype(np.float32)


def evaluate(
    *,
    repository: Path,
    n_users: int = 2000,
    n_items: int = 800,
    seed: int = 0,
    params: hybrid.Params | None = None,
) -> dict:
    started = time.perf_counter()
    c = synthetic_community(n_users=n_users, n_items=n_items, seed=seed)
    embeddings = text_encoder_embeddings(c.prompts, repository)
    train, held = leave_last_out(c)
    n_items = len(c.prompts)
    matrix = hybrid.user_item_matrix(c.n_users, n_items, c.users[train], c.items[train], c.weights[train])
    now = float(c.times[train].max())
    popularity = hybrid.decayed_popularity(
        n_items, c.items[train], c.weights[train], c.times[train], now=now, half_life_days=14
    )
    model = hybrid.fit(matrix, embeddings, popularity, params=params or hybrid.Params(seed=seed))
    history = np.bincount(c.users[train], minlength=c.n_users)
    test_users = np.array(sorted(held))
    targets = np.array([held[u] for u in test_users])
    cold = history[test_users] <= COLD_MAX
    seen = (abs(matrix) > 0).astype(np.float32).tocsr()
    tastes = hybrid.tastes(model, matrix)
    results: dict[str, dict] = {}
    for name, options in ALGORITHMS.items():
        hits = np.zeros(len(test_users))
        gains = np.zeros(len(test_users))
        copies = np.zeros(len(test_users))  # the largest group of near-copies in each top 10
        for start in range(0, len(test_users), 256):
            batch = test_users[start : start + 256]
            ranked = hybrid.rank(
                model,
                model.user_factors[batch],
                tastes[batch],
                history[batch],
                seen[batch],
                k=K,
                parts=options["parts"],
                diversify=options["diversify"],
            )
            for j, row in enumerate(ranked.items):
                vectors = model.embeddings[row[row >= 0]]
                copies[start + j] = ((vectors @ vectors.T) > hybrid.NEAR_COPY).sum(axis=1).max()
                where = np.flatnonzero(row == targets[start + j])
                if len(where):
                    hits[start + j] = 1.0
                    gains[start + j] = 1.0 / np.log2(where[0] + 2)
        results[name] = {
            "recall@10": float(hits.mean()),
            "ndcg@10": float(gains.mean()),
            "cold_recall@10": float(hits[cold].mean()) if cold.any() else None,
            "cold_ndcg@10": float(gains[cold].mean()) if cold.any() else None,
            "largest_near_copy_group@10": float(copies.mean()),
        }
    return {
        "seed": seed,
        "users": c.n_users,
        "items": n_items,
        "interactions": len(c.users),
        "test_users": len(test_users),
        "cold_start_users": int(cold.sum()),
        "params": asdict(model.params),
        "embeddings": "text_encoder pooler_output (ONNX Runtime, demo model)",
        "results": results,
        "ratios": ratios(results),
        "seconds": time.perf_counter() - started,
    }


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """Recall@10 of each hybrid over popularity's, overall and on cold-start users."""
    pop = results["popularity"]
    out = {}
    for name in ("hybrid", "hybrid (no diversity)"):
        out[f"{name} / popularity recall@10"] = results[name]["recall@10"] / max(pop["recall@10"], 1e-9)
        out[f"{name} / popularity cold recall@10"] = (results[name]["cold_recall@10"] or 0) / max(
            pop["cold_recall@10"] or 0, 1e-9
        )
    return out


def combine(reports: list[dict]) -> dict:
    """The mean over several seeds' reports (each kept under ``per_seed``)."""
    first = reports[0]
    results = {
        name: {
            metric: float(np.mean([r["results"][name][metric] for r in reports]))
            for metric in first["results"][name]
        }
        for name in first["results"]
    }
    return {
        "seeds": [r["seed"] for r in reports],
        "users": first["users"],
        "items": first["items"],
        "interactions": int(np.mean([r["interactions"] for r in reports])),
        "test_users": int(np.mean([r["test_users"] for r in reports])),
        "cold_start_users": int(np.mean([r["cold_start_users"] for r in reports])),
        "params": first["params"],
        "embeddings": first["embeddings"],
        "results": results,
        "ratios": ratios(results),
        "per_seed": reports,
    }


def table(report: dict) -> str:
    seeds = report.get("seeds", [report.get("seed")])
    lines = [
        f"{report['users']} users, {report['items']} items, ~{report['interactions']} interactions; "
        f"~{report['test_users']} test users, ~{report['cold_start_users']} cold-start (<= {COLD_MAX}); "
        f"mean over seeds {seeds}",
        f"{'algorithm':<24}{'recall@10':>10}{'NDCG@10':>10}{'cold R@10':>11}{'cold NDCG':>11}"
        f"{'copies@10':>11}",
    ]
    for name, r in report["results"].items():
        lines.append(
            f"{name:<24}{r['recall@10']:>10.3f}{r['ndcg@10']:>10.3f}"
            f"{r['cold_recall@10']:>11.3f}{r['cold_ndcg@10']:>11.3f}"
            f"{r['largest_near_copy_group@10']:>11.2f}"
        )
    for name, value in report["ratios"].items():
        lines.append(f"{name}: {value:.2f}x")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (metric, title) in zip(axes, (("recall@10", "recall@10"), ("ndcg@10", "NDCG@10")), strict=True):
        x = np.arange(len(names))
        ax.bar(x - 0.2, [report["results"][n][metric] for n in names], 0.4, label="all test users")
        ax.bar(
            x + 0.2, [report["results"][n]["cold_" + metric] for n in names], 0.4, label="cold start (<= 3)"
        )
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    seeds = report.get("seeds", [report.get("seed")])
    fig.suptitle(f"Recommender, synthetic community (seeds {seeds}), leave-last-out by time")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(report: dict, json_path: Path, png_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, png_path)
