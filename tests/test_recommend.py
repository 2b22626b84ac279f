"""Scorers against closed forms and hand computations, the blend, and the reference numbers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from segrec.errors import ConfigError
from segrec.evaluate import Split, evaluate_scores, protocol_split, top_k
from segrec.recommend import (
    EASE,
    Blend,
    ItemKNN,
    MostPop,
    Scorer,
    SegmentPopularity,
    cosine_scores,
    recommend_top_n,
    standardise,
    tune_blend,
    tune_ease,
)

MOVIELENS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"


def synthetic_split(seed: int = 0, n_users: int = 80, n_items: int = 40) -> Split:
    """Users with overlapping tastes (two item blocks), so collaborative scorers have signal."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        block = u % 2
        pool = np.arange(block * n_items // 2, (block + 1) * n_items // 2)
        pool = np.concatenate([pool, rng.choice(n_items, size=4, replace=False)])
        items = rng.choice(np.unique(pool), size=int(rng.integers(6, 15)), replace=False)
        rows += [(f"u{u}", f"i{i}", int(t)) for t, i in enumerate(items)]
    return protocol_split(
        pd.DataFrame(
            {
                "user_id": [r[0] for r in rows],
                "item_id": [r[1] for r in rows],
                "value": 1.0,
                "timestamp": pd.array([r[2] for r in rows], dtype="Int64"),
                "line": np.arange(len(rows)),
            }
        )
    )


# --- scorers -------------------------------------------------------------------------------


def test_mostpop_counts_users_per_item() -> None:
    X = sp.csr_matrix(np.array([[1, 1, 0], [0, 1, 0], [0, 1, 1]], dtype=np.float32))
    scorer: Scorer = MostPop().fit(X)
    scores = scorer.score(X[:2])
    assert scores.dtype == np.float32
    assert scores.tolist() == [[1, 3, 1], [1, 3, 1]]


def test_itemknn_by_hand() -> None:
    X = sp.csr_matrix(np.array([[1, 1, 0], [0, 1, 1], [1, 1, 1]], dtype=np.float32))
    # Columns (1,0,1), (1,1,1), (0,1,1): cos01 = 2/√6, cos02 = 1/2, cos12 = 2/√6.
    c01, c02, c12 = 2 / math.sqrt(6), 0.5, 2 / math.sqrt(6)
    knn = ItemKNN().fit(X)
    expected = np.array([[0, c01, c02], [c01, 0, c12], [c02, c12, 0]])
    np.testing.assert_allclose(knn.similarity.toarray(), expected, atol=1e-6)
    # User with items 0 and 1: item 2 scores cos02 + cos12; items 0/1 get the other's cosine.
    scores = knn.score(sp.csr_matrix(np.array([[1, 1, 0]], dtype=np.float32)))
    assert scores[0] == pytest.approx([c01, c01, c02 + c12], abs=1e-6)


def test_itemknn_neighbourhood_keeps_each_items_closest() -> None:
    X = sp.csr_matrix(np.array([[1, 1, 0], [0, 1, 1], [1, 1, 1]], dtype=np.float32))
    similarity = ItemKNN(neighbours=1).fit(X).similarity.toarray()
    c = 2 / math.sqrt(6)
    # Column 0 keeps item 1; column 1 has a tie (items 0 and 2) and keeps the lower index 0;
    # column 2 keeps item 1.
    np.testing.assert_allclose(similarity, [[0, c, 0], [c, 0, c], [0, 0, 0]], atol=1e-6)


def ease_by_ridge(X: np.ndarray, lam: float) -> np.ndarray:
    """min ||X − XB||² + λ||B||² with diag(B) = 0 is, column by column, a ridge regression
    of item j on every other item; solved directly here."""
    n = X.shape[1]
    B = np.zeros((n, n))
    for j in range(n):
        others = [i for i in range(n) if i != j]
        Xo = X[:, others]
        B[others, j] = np.linalg.solve(Xo.T @ Xo + lam * np.eye(n - 1), Xo.T @ X[:, j])
    return B


def test_ease_closed_form_matches_the_constrained_least_squares() -> None:
    rng = np.random.default_rng(0)
    X = (rng.random((12, 5)) < 0.5).astype(np.float64)
    X[0] = 1.0
    model = EASE(lam=2.0).fit(sp.csr_matrix(X))
    assert model.B.dtype == np.float32
    assert np.allclose(model.B, ease_by_ridge(X, 2.0), atol=1e-5)
    assert np.all(np.diag(model.B) == 0)
    scores = model.score(sp.csr_matrix(X[:3]))
    assert scores.dtype == np.float32
    assert np.allclose(scores, X[:3] @ model.B, atol=1e-5)


def _small_population(seed: int = 0) -> tuple[np.ndarray, sp.csr_matrix]:
    """Fewer users than items, some histories long (the case the fast forms are for)."""
    rng = np.random.default_rng(seed)
    X = (rng.random((15, 60)) < rng.uniform(0.05, 0.7, size=(15, 1))).astype(np.float64)
    X[:, -3:] = 0.0  # items nobody has: zero columns
    return X, sp.csr_matrix(X, dtype=np.float32)


def test_itemknn_scores_through_the_fit_matrix_the_same_as_through_s() -> None:
    """Long histories go through (x·Xnᵀ)·Xn − x∘diag, short ones through S; both equal the
    hand-computed cosine sums, and a saved-and-loaded ranker takes the same paths."""
    from segrec.ranker import Ranker, RankerSpec

    X, Xs = _small_population()
    norms = np.linalg.norm(X, axis=0)
    Xn = X / np.where(norms > 0, norms, 1.0)
    S = Xn.T @ Xn
    np.fill_diagonal(S, 0.0)
    users = np.vstack([X, np.eye(60)[[0, 5]], np.zeros((1, 60))])  # + two one-item users
    knn = ItemKNN().fit(Xs)
    paths = knn.through_data(sp.csr_matrix(users))
    assert paths.any() and not paths.all()  # both paths in one batch
    assert not paths[-3:].any()  # a one-item history is cheaper through S
    np.testing.assert_allclose(knn.score(sp.csr_matrix(users)), users @ S, atol=1e-5)
    spec = RankerSpec(weights={"long": {"itemknn": 1.0}}, neighbours=None, ease_lambda=None)
    ranker = Ranker(spec, None, names=["itemknn"]).fit(Xs)
    loaded = Ranker.from_arrays(spec, None, ranker.arrays())
    assert loaded.knn is not None and loaded.knn.normalised is not None
    np.testing.assert_allclose(loaded.knn.score(sp.csr_matrix(users)), users @ S, atol=1e-5)
    # Pruned neighbourhoods cannot be factored: always through S.
    assert not ItemKNN(neighbours=5).fit(Xs).through_data(sp.csr_matrix(users)).any()


def test_ease_scores_through_the_user_space_the_same_as_through_b() -> None:
    X, Xs = _small_population(1)
    model = EASE(lam=3.0).fit(Xs)
    assert model.dual is not None  # 15 users < 60 items
    users = sp.csr_matrix(np.vstack([X, np.eye(60)[[2]]]), dtype=np.float32)
    reference = users.toarray() @ ease_by_ridge(np.vstack([X]), 3.0)
    np.testing.assert_allclose(model.dual.score(users), reference, atol=1e-5)
    np.testing.assert_allclose(model.score(users), reference, atol=1e-5)
    long = np.diff(users.indptr) * 60 > model.dual.cost
    assert long.any() and not long.all()  # the batch used both forms
    assert EASE(lam=3.0).fit(sp.csr_matrix(np.vstack([X] * 5))).dual is None  # users > items


def test_scorers_refuse_to_score_before_fit_and_bad_parameters() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        EASE().score(sp.csr_matrix((1, 3)))
    with pytest.raises(ValueError, match="λ"):
        EASE(lam=0)
    with pytest.raises(ValueError, match="neighbours"):
        ItemKNN(neighbours=0)


def test_tune_ease_picks_a_lambda_on_validation() -> None:
    split = synthetic_split()
    lam, results = tune_ease(split, lams=(1.0, 10.0, 100.0))
    assert set(results) == {1.0, 10.0, 100.0}
    assert lam in results
    assert results[lam] == max(results.values())


def test_segment_popularity_uses_the_users_segment_or_global() -> None:
    X = sp.csr_matrix(np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 1]], dtype=np.float32))
    model = SegmentPopularity().fit(X, np.array([0, 0, 1, -1]))
    scores = model.score(sp.csr_matrix((4, 3)), [0, 1, None, 7])
    assert scores.tolist() == [[2, 1, 0], [0, 0, 1], [2, 2, 2], [2, 2, 2]]
    with pytest.raises(ValueError, match="labels"):
        model.score(sp.csr_matrix((2, 3)), [0])


def test_cosine_scores_normalises_and_handles_zero_vectors() -> None:
    users = np.array([[3.0, 4.0], [0.0, 0.0]])
    items = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    assert cosine_scores(users, items) == pytest.approx(np.array([[0.6, 0.8, 0], [0, 0, 0]]))
    unit_items = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert cosine_scores(users, unit_items, normalise_items=False) == pytest.approx(
        np.array([[0.6, 0.8], [0, 0]])
    )
    with pytest.raises(ValueError, match="2-d"):
        cosine_scores(users, np.ones((2, 3)))


# --- blend and ranking ---------------------------------------------------------------------


def test_blend_with_only_ease_weight_ranks_exactly_like_ease() -> None:
    split = synthetic_split(seed=2)
    ease = EASE(lam=5.0).fit(split.fit).score(split.train)
    pop = MostPop().fit(split.fit).score(split.train)
    blended = Blend({"ease": 1.0, "pop": 0.0}).combine({"ease": ease, "pop": pop})
    assert np.array_equal(top_k(blended, 20, split.train), top_k(ease, 20, split.train))
    assert evaluate_scores(blended, split) == evaluate_scores(ease, split)


def test_blend_standardises_each_signal_per_user() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.random((4, 6)), rng.random((4, 6))
    combined = Blend({"a": 2.0, "b": 0.5}).combine({"a": 1000 * a, "b": b + 7})
    z = (a - a.mean(axis=1, keepdims=True)) / a.std(axis=1, keepdims=True)
    zb = (b - b.mean(axis=1, keepdims=True)) / b.std(axis=1, keepdims=True)
    assert combined == pytest.approx(2.0 * z + 0.5 * zb)
    assert standardise(np.ones((2, 3))).tolist() == [[0, 0, 0], [0, 0, 0]]


def test_blend_errors_name_the_weight() -> None:
    with pytest.raises(ConfigError, match="'cosine'"):
        Blend({"cosine": 0.3}).combine({"ease": np.ones((1, 2))})
    with pytest.raises(ConfigError, match="every weight is 0"):
        Blend({"ease": 0.0}).combine({"ease": np.ones((1, 2))})


def test_tune_blend_finds_a_mix_better_than_each_signal_alone() -> None:
    split = synthetic_split(seed=1)
    rng = np.random.default_rng(0)
    # Each signal knows half of every user's test items (by column parity), plus noise.
    odd = np.zeros((split.n_users, split.n_items))
    even = np.zeros_like(odd)
    for row, items in enumerate(split.test):
        odd[row, items[items % 2 == 1]] = 1.0
        even[row, items[items % 2 == 0]] = 1.0
    signals = {
        "odd": odd + 0.3 * rng.random(odd.shape),
        "even": even + 0.3 * rng.random(odd.shape),
        "noise": rng.random(odd.shape),
    }
    blend, trace = tune_blend(signals, split)
    singles = {
        name: evaluate_scores(signals[name], split)["ndcg@10"] for name in ("odd", "even", "noise")
    }
    chosen = evaluate_scores(blend.combine(signals), split)["ndcg@10"]
    assert chosen > max(singles.values())
    assert {"odd", "even"} <= set(blend.weights)
    assert chosen == pytest.approx(max(entry["ndcg@10"] for entry in trace))
    single_entries = [e for e in trace if sum(w != 0 for w in e["weights"].values()) == 1]
    assert len(single_entries) == 3


def test_tune_blend_falls_back_to_the_single_best_signal() -> None:
    split = synthetic_split(seed=4)
    ease = EASE(lam=5.0).fit(split.fit).score(split.train)
    noise = np.random.default_rng(1).random(ease.shape)
    blend, _ = tune_blend({"ease": ease, "noise": noise}, split)
    assert (
        evaluate_scores(blend.combine({"ease": ease, "noise": noise}), split)["ndcg@10"]
        >= evaluate_scores(ease, split)["ndcg@10"]
    )


def test_recommend_top_n_filters_seen_and_disallowed_items() -> None:
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]], dtype=np.float32)
    seen = sp.csr_matrix(np.array([[1, 0, 0, 0, 0], [0, 0, 0, 0, 1]]))
    indices, values = recommend_top_n(scores, seen, 2)
    assert indices.tolist() == [[1, 2], [3, 2]]
    assert values == pytest.approx(np.array([[0.8, 0.7], [0.4, 0.3]]))
    allowed = np.array([True, True, False, True, True])
    indices, _ = recommend_top_n(scores, seen, 2, allowed=allowed)
    assert indices.tolist() == [[1, 3], [3, 1]]
    per_user = np.array([[False, False, False, False, True], [True, True, True, True, True]])
    indices, values = recommend_top_n(scores, seen, 2, allowed=per_user)
    assert indices.tolist() == [[4, -1], [3, 2]]
    assert values[0, 1] == -np.inf


# --- the reference run on ml-latest-small ---------------------------------------------------


@pytest.fixture(scope="module")
def movielens_split() -> Split:
    path = MOVIELENS / "ratings.csv"
    if not path.exists():
        pytest.skip("ml-latest-small is not in ../shared/data")
    ratings = pd.read_csv(path)
    return protocol_split(
        pd.DataFrame(
            {
                "user_id": ratings["userId"].astype(str),
                "item_id": ratings["movieId"].astype(str),
                "value": ratings["rating"].astype(float),
                "timestamp": ratings["timestamp"].astype("Int64"),
                "line": np.arange(2, len(ratings) + 2),
            }
        )
    )


@pytest.fixture(scope="module")
def movielens_ease(movielens_split: Split) -> np.ndarray:
    """EASE λ=200 scores: ~8k items, float64 Cholesky inverse, ~40 s on 2 cores."""
    return EASE(200.0).fit(movielens_split.fit).score(movielens_split.train)


@pytest.mark.parametrize(
    ("scorer", "ndcg", "recall"),
    [(MostPop(), 0.0877, 0.0973), (ItemKNN(), 0.1052, 0.1359)],
    ids=["mostpop", "itemknn"],
)
def test_reproduces_the_protocol_reference_numbers(
    movielens_split: Split, scorer: Scorer, ndcg: float, recall: float
) -> None:
    assert movielens_split.n_users == 610
    scores = scorer.fit(movielens_split.fit).score(movielens_split.train)
    result = evaluate_scores(scores, movielens_split)
    assert result["ndcg@10"] == pytest.approx(ndcg, abs=0.001)
    assert result["recall@20"] == pytest.approx(recall, abs=0.001)


def test_reproduces_the_protocol_reference_ease(
    movielens_split: Split, movielens_ease: np.ndarray
) -> None:
    result = evaluate_scores(movielens_ease, movielens_split)
    assert result["ndcg@10"] == pytest.approx(0.1301, abs=0.001)
    assert result["recall@20"] == pytest.approx(0.1671, abs=0.001)


def test_ease_only_blend_on_movielens_ranks_like_ease(
    movielens_split: Split, movielens_ease: np.ndarray
) -> None:
    pop = MostPop().fit(movielens_split.fit).score(movielens_split.train)
    blended = Blend({"ease": 1.0, "pop": 0.0}).combine({"ease": movielens_ease, "pop": pop})
    assert np.array_equal(
        top_k(blended, 20, movielens_split.train), top_k(movielens_ease, 20, movielens_split.train)
    )
