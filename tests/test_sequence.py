"""The order- and time-aware parts of #13: transitions, ALS, event times through every split,
and the leakage guard (no model sees a test interaction)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from segrec.evaluate import (
    Split,
    cold_split,
    protocol_split,
    stacked_cold_split,
    subsample,
    validation_split,
)
from segrec.ranker import SIGNALS, Ranker, kmeans_labels, split_signals, tune_ranker
from segrec.recommend import ALS, RecentPopularity, Transitions, recency_weights, tune_blend
from segrec.synthetic import write_synthetic_log


def _times(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    """A time matrix: row u lists its items in the order they happened (times 1, 2, …)."""
    data, r, c = [], [], []
    for u, items in enumerate(rows):
        for t, i in enumerate(items, start=1):
            data.append(float(t))
            r.append(u)
            c.append(i)
    return sp.csr_matrix((data, (r, c)), shape=(len(rows), n_items))


def test_recency_weights_by_hand() -> None:
    times = _times([[2, 0, 3, 1], [1]], 4)  # user 0: item 2 first, item 1 latest
    weights = recency_weights(times, last=3, decay=0.5).toarray()
    np.testing.assert_allclose(weights[0], [0.25, 1.0, 0.0, 0.5])  # item 2 is 4th latest
    np.testing.assert_allclose(weights[1], [0.0, 1.0, 0.0, 0.0])


def test_transitions_by_hand() -> None:
    # a=0 → b=1 → c=2 for user 0; a → c for user 1.
    model = Transitions(last=1, gap=1).fit(_times([[0, 1, 2], [0, 2]], 4))
    # P(b|a) = P(c|a) = 1/2, P(c|b) = 1; popularity only breaks ties (×1e-6).
    np.testing.assert_allclose(model.next.toarray()[0], [0.0, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(model.next.toarray()[1], [0.0, 0.0, 1.0, 0.0])
    scores = model.score(_times([[3, 0]], 4))  # latest item: a
    np.testing.assert_allclose(scores[0], [1e-6, 0.5 + 0.5e-6, 0.5 + 1e-6, 0.0], rtol=1e-6)
    # gap 2 adds a → c at distance 2 with weight 1/2: P(c|a) = 1.5 / 2.5.
    wide = Transitions(last=1, gap=2).fit(_times([[0, 1, 2], [0, 2]], 4))
    np.testing.assert_allclose(wide.next.toarray()[0], [0.0, 0.4, 0.6, 0.0], rtol=1e-6)
    # The last two items, the latest weighted 1 and the one before 0.5: b then a.
    two = Transitions(last=2, decay=0.5, gap=1).fit(_times([[0, 1, 2], [0, 2]], 4))
    scores = two.score(_times([[1, 0]], 4))[0]
    assert scores[2] == pytest.approx(1.0 * 0.5 + 0.5 * 1.0, abs=1e-5)  # c after a, c after b
    assert scores[1] == pytest.approx(0.5, abs=1e-5)


def test_als_scores_are_the_closed_form_user_solve() -> None:
    """A user's factors solve (YᵀCY + λI) x = YᵀC p (Hu et al. 2008); implicit's confidence
    is alpha on an interaction and 1 elsewhere."""
    rng = np.random.default_rng(0)
    X = sp.csr_matrix((rng.random((30, 12)) < 0.3).astype(np.float32))
    model = ALS(factors=4, regularization=0.5, alpha=2.0, iterations=5).fit(X)
    Y = np.asarray(model.model.item_factors, dtype=np.float64)
    user = X[3].toarray().ravel()
    confidence = np.where(user > 0, 2.0, 1.0)
    A = Y.T @ (confidence[:, None] * Y) + 0.5 * np.eye(4)
    x = np.linalg.solve(A, Y.T @ (confidence * user))
    np.testing.assert_allclose(model.score(X[3]), (Y @ x)[None, :], rtol=1e-3, atol=1e-4)


def test_als_ranks_the_co_bought_item_first() -> None:
    # Two blocks of items bought together; a user with 0 and 1 should get 2 before 4.
    X = sp.csr_matrix(np.array([[1, 1, 1, 0, 0, 0]] * 10 + [[0, 0, 0, 1, 1, 1]] * 10, np.float32))
    scores = (
        ALS(factors=2, regularization=0.1, iterations=20)
        .fit(X)
        .score(sp.csr_matrix(np.array([[1, 1, 0, 0, 0, 0]], np.float32)))
    )
    assert scores[0, 2] > scores[0, 4]


def _log(n_users: int = 60, seed: int = 0) -> pd.DataFrame:
    """Two tastes, each with a chain a user walks in order (so order carries signal)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        block = u % 2
        chain = [block * 20 + k for k in range(6)]
        start = int(rng.integers(0, 3))
        items = chain[start : start + 3] + list(
            rng.choice(np.arange(block * 20 + 6, block * 20 + 20), 6, replace=False)
        )
        rng.shuffle(items[3:])
        rows += [(f"u{u}", f"i{i}", 100 * u + t) for t, i in enumerate(items)]
    return pd.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "value": 1.0,
            "timestamp": pd.array([r[2] for r in rows], dtype="Int64"),
            "line": np.arange(len(rows)),
        }
    )


def test_event_times_follow_every_split() -> None:
    split = protocol_split(_log())
    assert split.fit_time is not None and split.train_time is not None
    # Same sparsity as the binary matrices, times strictly positive.
    assert (split.fit_time != 0).sum() == split.fit.nnz
    assert (split.fit_time.data > 0).all()
    np.testing.assert_array_equal(split.train_time.indices, split.train.indices)
    cold = cold_split(split, 3)
    assert cold.train_time is not None
    np.testing.assert_array_equal(cold.train_time.indices, cold.train.indices)
    # The cold history is the user's 3 earliest train items: their times are the smallest.
    for u in range(3):
        row = split.train_time[u]
        first = np.sort(row.data)[:3]
        np.testing.assert_allclose(np.sort(cold.train_time[u].data), first)
    stacked = stacked_cold_split(split, (2, 3))
    assert stacked.train_time.shape == stacked.train.shape
    sample = subsample(split, 10, seed=1)
    np.testing.assert_array_equal(
        (sample.fit_time != 0).toarray(), sample.fit.toarray().astype(bool)
    )
    validation = validation_split(split)
    assert validation.fit_time.max() <= split.fit_time.max()


def test_transition_signal_ranks_the_known_next_item_first() -> None:
    split = protocol_split(_log())
    ranker = Ranker(_spec(), names=["transition"]).fit(split.fit, times=split.fit_time)
    # A user whose latest item is chain item 1 of taste 0 (i1): next comes i2.
    col = {item: c for c, item in enumerate(split.items)}
    history = _times([[col["i0"], col["i1"]]], len(split.items))
    scores = ranker.signals(sp.csr_matrix(history > 0, dtype=np.float32), times=history)
    assert split.items[int(np.argmax(scores["transition"][0]))] == "i2"


def _spec():  # type: ignore[no-untyped-def]
    from segrec.ranker import default_spec

    return default_spec(100)


def _with_other_tests(frame: pd.DataFrame, split: Split, seed: int) -> pd.DataFrame:
    """The same log with every test interaction moved to another item (one the user has not
    had in train) and a later time."""
    rng = np.random.default_rng(seed)
    known = split.train_frames.groupby("user_id")["item_id"].agg(set)
    changed = frame.copy()
    for index in changed.index[changed["line"].isin(set(split.test_frames["line"]))]:
        user = changed.at[index, "user_id"]
        pool = [i for i in split.items if i not in known.get(user, set())]
        changed.at[index, "item_id"] = pool[int(rng.integers(len(pool)))]
        changed.at[index, "timestamp"] += 50
    return changed


def test_no_model_or_signal_sees_a_test_interaction() -> None:
    """Leakage guard: change every test interaction (item and time) and every signal, peer
    and tuned weight must stay the same, on the warm, validation and cold tracks."""
    frame = _log()
    base = protocol_split(frame)
    other = protocol_split(_with_other_tests(frame, base, seed=3))
    assert base.items == other.items and base.users == other.users
    assert any(not np.array_equal(a, b) for a, b in zip(base.test, other.test, strict=True))
    vectors = np.random.default_rng(0).normal(size=(len(base.items), 8)).astype(np.float32)

    def vectors_for(part: Split) -> np.ndarray:
        index = {item: i for i, item in enumerate(base.items)}
        return vectors[[index[i] for i in part.items]]

    def categories_for(part: Split) -> list[tuple[str, ...]]:
        # Two planted tastes (items i0-i19 and i20-i39), a category each, one shared.
        return [(f"taste{int(i[1:]) // 20}", "all") for i in part.items]

    labels = {id(base): kmeans_labels(base, vectors_for, 2, 0)}
    labels[id(other)] = kmeans_labels(other, vectors_for, 2, 0)
    spec = tune_ranker(
        base,
        item_vectors_for=vectors_for,
        labels_for=labels[id(base)],
        categories_for=categories_for,
    )
    again = tune_ranker(
        other,
        item_vectors_for=vectors_for,
        labels_for=labels[id(other)],
        categories_for=categories_for,
    )
    assert spec.as_dict() == again.as_dict()
    assert "transition" in spec.signals  # the order signal is among those checked
    for make in (lambda s: s, validation_split, lambda s: cold_split(s, 3)):
        a, b = make(base), make(other)
        sa = split_signals(
            a,
            spec,
            SIGNALS,
            item_vectors=vectors_for(a),
            labels_for=labels[id(base)],
            categories=categories_for(a),
        )
        sb = split_signals(
            b,
            spec,
            SIGNALS,
            item_vectors=vectors_for(b),
            labels_for=labels[id(other)],
            categories=categories_for(b),
        )
        assert np.ptp(sa["category_pop"]) > 0  # the category signal is among those checked
        for name in SIGNALS:
            np.testing.assert_array_equal(sa[name], sb[name], err_msg=name)
        als_a = ALS(factors=4, iterations=3).fit(a.fit).score(a.train)
        als_b = ALS(factors=4, iterations=3).fit(b.fit).score(b.train)
        np.testing.assert_array_equal(als_a, als_b)


def test_tune_blend_on_candidates_matches_the_whole_catalogue_for_single_signals() -> None:
    rng = np.random.default_rng(2)
    rows = [
        (f"u{u}", f"i{i}", t)
        for u in range(150)
        for t, i in enumerate(rng.choice(np.arange(u % 2 * 100, u % 2 * 100 + 100), 12, False))
    ]
    split = protocol_split(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]))
    assert len(split.items) > 4 * 20
    signals = split_signals(split, _spec(), ["pop", "itemknn", "transition"], item_vectors=None)
    _, exact = tune_blend(signals, split, candidates=None)
    _, pruned = tune_blend(signals, split, candidates=5)  # at least 20 are kept
    singles = [t for t in exact if sum(w > 0 for w in t["weights"].values()) == 1]
    assert len(singles) == 3
    for entry in singles:
        match = next(t for t in pruned if t["weights"] == entry["weights"])
        assert match["ndcg@10"] == pytest.approx(entry["ndcg@10"])
        assert match["recall@20"] == pytest.approx(entry["recall@20"])


def test_product_log_has_no_category_and_planted_chains(tmp_path: Path) -> None:
    data = write_synthetic_log(
        tmp_path, n_users=200, n_events=4000, n_items=300, n_segments=4, product=True, seed=1
    )
    items = pd.read_csv(data.items)
    assert list(items.columns) == ["item_id", "title"]
    assert items["title"].str.len().min() > 40
    log = pd.read_csv(data.log)
    assert "value" not in log.columns and "rating" not in log.columns
    assert (log.groupby("user_id")["timestamp"].diff().dropna() > 0).all()
    # Chains: some item pair follows consecutively far more often than chance would give.
    nxt = log.groupby("user_id")["item_id"].shift(-1)
    pairs = (log["item_id"] + ">" + nxt).dropna().value_counts()
    assert pairs.iloc[0] >= 10
    again = write_synthetic_log(
        tmp_path / "again",
        n_users=200,
        n_events=4000,
        n_items=300,
        n_segments=4,
        product=True,
        seed=1,
    )
    assert again.log.read_bytes() == data.log.read_bytes()


def test_per_segment_weights_are_never_worse_than_global_on_validation() -> None:
    from segrec.evaluate import evaluate_scores
    from segrec.ranker import SEGMENT_MIN_USERS, tune_segment_weights
    from segrec.recommend import Blend

    split = protocol_split(_log(240))
    validation = validation_split(split)
    names = ["pop", "itemknn", "transition", "ease"]
    signals = split_signals(validation, _spec(), names, item_vectors=None)
    labels = np.array([int(u[1:]) % 2 for u in validation.users])  # the planted tastes
    labels[:5] = 2  # a segment too small to tune
    global_weights = {"pop": 1.0}  # a deliberately poor global set: segments can beat it
    kept, report = tune_segment_weights(signals, validation, labels, global_weights)
    assert report["2"]["strategy"].startswith("global") and report["2"]["users"] < SEGMENT_MIN_USERS
    assert kept, "no segment beat popularity alone"
    for label, entry in report.items():
        if "gain" not in entry:
            continue
        rows = np.flatnonzero(labels == int(label))
        part = replace(
            validation,
            users=[validation.users[r] for r in rows],
            train=validation.train[rows],
            test=[validation.test[r] for r in rows],
        )
        own = {n: m[rows] for n, m in signals.items()}
        base = evaluate_scores(Blend(global_weights).combine(own), part)["ndcg@10"]
        used = kept.get(label, global_weights)
        assert evaluate_scores(Blend(used).combine(own), part)["ndcg@10"] >= base
        assert (label in kept) == (entry["gain"] > 0)
    # The ranker applies a segment's weights to its members only, given their labels.
    spec = _spec()
    spec.weights["long"] = dict(global_weights)
    spec.segment_weights = {"long": kept}
    ranker = Ranker(spec, names=names)
    label = next(iter(kept))
    assert ranker.weights_for("long", int(label)) == kept[label]
    assert ranker.weights_for("long", None) == global_weights
    assert ranker.weights_for("short", int(label)) == spec.weights["short"]


def test_recent_popularity_by_hand_counts_only_whole_bins_before_the_users_latest_event() -> None:
    # Events: item 0 at t=1, item 1 at t=2 and t=3 (two users), item 2 at t=10.
    times = sp.csr_matrix(([1.0, 2.0, 3.0, 10.0], ([0, 0, 1, 1], [0, 1, 1, 2])), shape=(2, 3))
    # 4 bins of one event each: [1, 1.75) [1.75, 2.5) [2.5, 4.75) [4.75, 10].
    one = RecentPopularity(window=1, bins=4).fit(times)
    users = sp.csr_matrix(([3.0, 10.0], ([0, 1], [0, 0])), shape=(2, 3))  # latest: 3 and 10
    # At t=3 the bin holding t=3 is not whole yet: only the t=2 event counts.
    np.testing.assert_array_equal(one.score(users, 2), [[0, 1, 0], [0, 1, 0]])
    two = RecentPopularity(window=2, bins=4).fit(times)
    np.testing.assert_array_equal(two.score(users, 2)[0], [1, 1, 0])
    # No known time (a new user): the data's latest window.
    np.testing.assert_array_equal(one.score(None, 1), [[0, 0, 1]])


def test_ease_fits_are_reused_only_inside_reuse_ease_fits() -> None:
    from segrec.recommend import EASE, reuse_ease_fits

    X = sp.csr_matrix((np.random.default_rng(0).random((20, 8)) < 0.4).astype(np.float32))
    with reuse_ease_fits():
        first, again = EASE(10.0).fit(X), EASE(10.0).fit(X)
        assert again.B is first.B
        assert EASE(20.0).fit(X).B is not first.B  # another λ is another fit
        assert EASE(10.0).fit(X[:10]).B is not first.B  # another matrix too
    outside = EASE(10.0).fit(X)
    assert outside.B is not first.B
    np.testing.assert_array_equal(outside.B, first.B)
