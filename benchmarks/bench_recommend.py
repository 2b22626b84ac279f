"""Serving speed of the default ranker: `recommend --all` and one-user latency.

1. ``recommend --all`` on ml-latest-small (610 users × 9,742 items, the ranker fitted on
   every interaction with ml-latest-small's tuned weights): segrec's `Ranker.recommend`
   (signals, per-user z-scores, blend, seen-item exclusion, top-10, per-signal parts) against
   a plain numpy pipeline over the *same* score matrices (z-score, weighted sum, mask seen,
   argpartition + sort). Ratio = segrec / numpy, alternating rounds, best of each.
2. Top-k alone: `segrec.recommend.recommend_top_n` against ``np.argpartition`` + sort over the
   same blended score matrix (segrec also breaks ties deterministically).
3. One-user latency (p50/p99 over 300 users) on synthetic catalogues of 10k items (EASE on)
   and 100k items (EASE off: ItemKNN keeps 200 neighbours per item), 384-d item vectors.

Run: python benchmarks/bench_recommend.py   (writes benchmarks/results/recommend.md)
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "ml-latest-small"

from segrec.data import item_text  # noqa: E402
from segrec.embed import SentenceTransformerEncoder, embed_texts  # noqa: E402
from segrec.ranker import DEFAULT_WEIGHTS, Ranker, RankerSpec, default_spec  # noqa: E402
from segrec.recommend import recommend_top_n, standardise  # noqa: E402

N = 10


def movielens() -> tuple[sp.csr_matrix, np.ndarray]:
    ratings = pd.read_csv(DATA / "ratings.csv", dtype={"userId": str, "movieId": str})
    movies = pd.read_csv(DATA / "movies.csv", dtype={"movieId": str})
    item_index = pd.Index(movies["movieId"])
    users = pd.Index(pd.unique(ratings["userId"]))
    X = sp.csr_matrix(
        (
            np.ones(len(ratings), dtype=np.float32),
            (users.get_indexer(ratings["userId"]), item_index.get_indexer(ratings["movieId"])),
        ),
        shape=(len(users), len(item_index)),
    )
    X.sum_duplicates()
    X.data[:] = 1.0
    texts = [
        item_text(t, "", [] if g == "(no genres listed)" else g.split("|"))
        for t, g in zip(movies["title"], movies["genres"], strict=True)
    ]
    vectors = embed_texts(texts, SentenceTransformerEncoder())
    return X, vectors


def numpy_recommend(
    signals: dict[str, np.ndarray], weights: dict[str, float], X: sp.csr_matrix, n: int
) -> np.ndarray:
    total = sum(w * standardise(signals[name]) for name, w in weights.items())
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    total[rows, X.indices] = -np.inf
    part = np.argpartition(-total, n, axis=1)[:, :n]
    order = np.argsort(-np.take_along_axis(total, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def bench_all(X: sp.csr_matrix, vectors: np.ndarray, rounds: int = 3) -> dict[str, float]:
    spec = RankerSpec(weights=DEFAULT_WEIGHTS, ease_lambda=200.0)
    ranker = Ranker(spec, vectors).fit(X)
    weights = spec.weights["long"]
    seg, raw, topk_seg, topk_raw = [], [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        recs = ranker.recommend(X, N)
        seg.append(time.perf_counter() - start)
        start = time.perf_counter()
        signals = ranker.signals(X, names=list(weights))
        plain = numpy_recommend(signals, weights, X, N)
        raw.append(time.perf_counter() - start)
        total, _ = ranker.blend(signals, ranker.groups(X))
        start = time.perf_counter()
        recommend_top_n(total, X, N)
        topk_seg.append(time.perf_counter() - start)
        start = time.perf_counter()
        masked = total.copy()
        masked[np.repeat(np.arange(X.shape[0]), np.diff(X.indptr)), X.indices] = -np.inf
        part = np.argpartition(-masked, N, axis=1)[:, :N]
        np.take_along_axis(part, np.argsort(-np.take_along_axis(masked, part, 1), 1), 1)
        topk_raw.append(time.perf_counter() - start)
    short = ranker.groups(X) == "short"
    agree = float((recs.indices[~short] == plain[~short]).mean())
    return {
        "users": X.shape[0],
        "items": X.shape[1],
        "segrec_s": min(seg),
        "numpy_s": min(raw),
        "ratio": min(seg) / min(raw),
        "users_per_s": X.shape[0] / min(seg),
        "topk_segrec_s": min(topk_seg),
        "topk_numpy_s": min(topk_raw),
        "topk_ratio": min(topk_seg) / min(topk_raw),
        "same_items": agree,
    }


def synthetic(n_items: int, n_users: int = 5000, seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    popularity /= popularity.sum()
    lengths = rng.integers(5, 60, size=n_users)
    rows = np.repeat(np.arange(n_users), lengths)
    cols = rng.choice(n_items, size=lengths.sum(), p=popularity)
    X = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n_users, n_items)
    )
    X.sum_duplicates()
    X.data[:] = 1.0
    vectors = rng.standard_normal((n_items, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return X, vectors


def bench_latency(n_items: int, samples: int = 300) -> dict[str, float]:
    X, vectors = synthetic(n_items)
    spec = default_spec(n_items)
    start = time.perf_counter()
    ranker = Ranker(spec, vectors).fit(X)
    fit_s = time.perf_counter() - start
    rng = np.random.default_rng(1)
    times = []
    for user in rng.choice(X.shape[0], size=samples, replace=False):
        start = time.perf_counter()
        ranker.recommend(X[user], N)
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1000
    return {
        "items": n_items,
        "signals": ", ".join(spec.signals),
        "fit_s": fit_s,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def main() -> None:
    X, vectors = movielens()
    full = bench_all(X, vectors)
    latency = [bench_latency(10_000), bench_latency(100_000)]
    lines = [
        "# Serving speed (benchmarks/bench_recommend.py)",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {platform.platform()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, numpy {np.__version__}",
        "- command: `python benchmarks/bench_recommend.py`",
        "",
        f"## `recommend --all`: ml-latest-small, {full['users']} users × {full['items']} items",
        "",
        "| path | seconds (best of 3) | users/s |",
        "|---|---|---|",
        f"| segrec `Ranker.recommend` (signals, blend, exclusions, top-{N}, per-signal parts) "
        f"| {full['segrec_s']:.2f} | {full['users_per_s']:.0f} |",
        f"| plain numpy on the same signal matrices | {full['numpy_s']:.2f} | "
        f"{full['users'] / full['numpy_s']:.0f} |",
        f"| **ratio segrec / numpy** | **{full['ratio']:.2f}** | |",
        "",
        f"Top-{N} selection alone over the same blended scores: segrec "
        f"{full['topk_segrec_s'] * 1000:.0f} ms vs argpartition+sort "
        f"{full['topk_numpy_s'] * 1000:.0f} ms (ratio {full['topk_ratio']:.2f}; segrec also "
        "breaks ties by item order, so results are reproducible). Both paths return the same "
        f"items for {full['same_items']:.1%} of (user, rank) slots of long-history users "
        "(differences are ties).",
        "",
        "## One-user latency (synthetic catalogue, 5,000 users, Zipf popularity, 384-d items)",
        "",
        "| items | signals | fit (s) | p50 (ms) | p99 (ms) |",
        "|---|---|---|---|---|",
    ]
    for row in latency:
        lines.append(
            f"| {row['items']:,} | {row['signals']} | {row['fit_s']:.1f} | "
            f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} |"
        )
    lines += [
        "",
        "Latency is `Ranker.recommend` for one user with a fitted ranker (what a service "
        "holding the ranker in memory pays). The CLI additionally loads the workspace and "
        "refits the models on every call (seconds; EASE dominates).",
    ]
    out = ROOT / "benchmarks" / "results" / "recommend.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
