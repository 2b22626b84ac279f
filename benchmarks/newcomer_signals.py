"""Candidate cold-start signals on ml-latest-small's cold track (issue #13), measured the way
the ranker would use them: each alone, and added to the short-history blend (pop + itemknn)
with weights tuned by `tune_blend` on the validation split's stacked cold cuts (2, 3, 4
known items); the test figure is the PROTOCOL cold track (3 known items) with those weights.

Candidates: RP3beta (item-item random walk, popularity penalty beta), UserKNN (neighbours
weighted by overlap / history-length^a, k nearest), a log-scaled ItemKNN, and category
signals from the known items' genres (share of the user's genres the item covers, alone,
per category, and times log popularity). Results: benchmarks/results/newcomers.md.

    python benchmarks/newcomer_signals.py [--data ../shared/data/ml-latest-small]

Dense users x items and items x items matrices: fine for ml-latest-small (9k items), not a
scale test.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from segrec.evaluate import (
    Split,
    cold_split,
    evaluate_scores,
    fold_scores,
    protocol_split,
    stacked_cold_split,
    validation_split,
)
from segrec.ranker import category_matrix, category_popularity, history_categories
from segrec.recommend import ItemKNN, tune_blend


def rp3beta(X: sp.csr_matrix, beta: float) -> np.ndarray:
    """W[i, j] = sum_u P(u|i) P(j|u) / pop(j)^beta, zero diagonal (dense, items x items)."""
    X = sp.csr_matrix(X, dtype=np.float32)
    du = np.maximum(np.asarray(X.sum(axis=1)).ravel(), 1)
    di = np.maximum(np.asarray(X.sum(axis=0)).ravel(), 1)
    W = ((sp.diags(1 / di) @ X.T) @ (sp.diags(1 / du) @ X)).toarray()
    W /= np.power(di, beta)[None, :]
    np.fill_diagonal(W, 0)
    return W


def userknn(F: sp.csr_matrix, known: sp.csr_matrix, a: float, k: int | None) -> np.ndarray:
    """sim(u, v) = |I_u ∩ I_v| / |I_v|^a over the k most similar fit users; score = sim·F."""
    F = sp.csr_matrix(F, dtype=np.float32)
    length = np.maximum(np.asarray(F.sum(axis=1)).ravel(), 1)
    S = (known @ F.T).toarray() / np.power(length, a)[None, :]
    if k is not None and k < S.shape[1]:
        drop = np.argpartition(-S, k, axis=1)[:, k:]
        np.put_along_axis(S, drop, 0, axis=1)
    return (sp.csr_matrix(S) @ F).toarray()


def signals(cold: Split, categories: list[list[str]]) -> dict[str, np.ndarray]:
    C, _ = category_matrix(categories)
    taste = history_categories(cold.train, C)

    def per_fold(make: Callable[[sp.csr_matrix, np.ndarray], np.ndarray]) -> np.ndarray:
        return fold_scores(cold, lambda fit, users: make(cold.fit[fit], users))

    def counts(F: sp.csr_matrix) -> np.ndarray:
        return np.asarray(F.sum(axis=0)).ravel()

    out = {
        "pop": per_fold(lambda F, u: np.tile(np.log1p(counts(F)), (len(u), 1))),
        "itemknn": per_fold(lambda F, u: ItemKNN().fit(F).score(cold.train[u])),
    }
    out["itemknn_log"] = np.log1p(100 * out["itemknn"])
    for beta in (0.0, 0.3, 0.5):
        out[f"rp3beta_{beta}"] = per_fold(
            lambda F, u, beta=beta: np.asarray(cold.train[u] @ rp3beta(F, beta))
        )
    for a in (0.5, 1.0):
        for k in (50, 200):
            out[f"userknn_a{a}_k{k}"] = per_fold(
                lambda F, u, a=a, k=k: userknn(F, cold.train[u], a, k)
            )
    cover = np.asarray((taste @ C.T).todense())
    out["category_cover"] = cover
    out["category_pop"] = per_fold(lambda F, u: category_popularity(counts(F), C, taste[u]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("../shared/data/ml-latest-small"))
    args = parser.parse_args()
    ratings = pd.read_csv(args.data / "ratings.csv")
    movies = pd.read_csv(args.data / "movies.csv")
    frame = pd.DataFrame(
        {
            "user_id": ratings["userId"],
            "item_id": ratings["movieId"],
            "value": ratings["rating"],
            "timestamp": ratings["timestamp"],
        }
    )
    genres = {
        str(i): [g for g in str(text).split("|") if g != "(no genres listed)"]
        for i, text in zip(movies["movieId"], movies["genres"], strict=True)
    }
    split = protocol_split(frame)
    val = stacked_cold_split(validation_split(split), (2, 3, 4), folds=2)
    test = cold_split(split, 3)
    on_val = signals(val, [genres.get(str(i), []) for i in val.items])
    on_test = signals(test, [genres.get(str(i), []) for i in test.items])
    print(
        "| signal | alone: validation | alone: test | + pop + itemknn: validation | test |", end=""
    )
    print(" weights |")
    print("|---|---|---|---|---|---|")
    for name in on_val:
        alone_val = evaluate_scores(on_val[name], val)["ndcg@10"]
        alone_test = evaluate_scores(on_test[name], test)["ndcg@10"]
        names = sorted({"pop", "itemknn", name})
        blend, trace = tune_blend({n: on_val[n] for n in names}, val)
        best = max(float(t["ndcg@10"]) for t in trace)
        tested = evaluate_scores(blend.combine(on_test), test)["ndcg@10"]
        print(
            f"| {name} | {alone_val:.4f} | {alone_test:.4f} | {best:.4f} | {tested:.4f} "
            f"| `{blend.weights}` |",
            flush=True,
        )


if __name__ == "__main__":
    main()
