"""The evaluation protocol: metrics by hand, top-k determinism, and the split's rules."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from segrec.errors import InputError
from segrec.evaluate import (
    Split,
    cold_split,
    evaluate_scores,
    fold_scores,
    ndcg_at_k,
    per_user_metrics,
    protocol_split,
    recall_at_k,
    stacked_cold_split,
    subsample,
    top_k,
    validation_split,
)


def frame(rows: list[tuple[str, str, int | None]]) -> pd.DataFrame:
    """Interactions in the data model's shape; ``line`` is the file order (header = line 1)."""
    return pd.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "value": [1.0] * len(rows),
            "timestamp": pd.array([r[2] for r in rows], dtype="Int64"),
            "line": np.arange(2, len(rows) + 2),
        }
    )


def history(split: Split, user: str, part: str = "train") -> list[str]:
    frames = split.train_frames if part == "train" else split.test_frames
    return list(frames.loc[frames["user_id"] == user, "item_id"])


# --- metrics -------------------------------------------------------------------------------


def test_ndcg_by_hand() -> None:
    # ranked [3, 1, 2], relevant {1, 2}: hits at ranks 2 and 3.
    dcg = 1 / math.log2(3) + 1 / math.log2(4)
    idcg = 1 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(np.array([3, 1, 2]), np.array([1, 2])) == pytest.approx(dcg / idcg)
    assert dcg / idcg == pytest.approx(0.693426, abs=1e-6)


def test_ndcg_cutoff_and_ideal_over_min_k_relevant() -> None:
    assert ndcg_at_k(np.array([0, 1, 2, 3]), np.array([3]), k=3) == 0.0
    # Five relevant items but k = 2: two hits at the top is already ideal.
    assert ndcg_at_k(np.array([1, 2, 9]), np.array([1, 2, 3, 4, 5]), k=2) == pytest.approx(1.0)
    # One relevant item at rank 2: 1/log2(3) over the ideal 1.
    assert ndcg_at_k(np.array([7, 4]), np.array([4])) == pytest.approx(1 / math.log2(3))
    assert ndcg_at_k(np.array([1, 2]), np.array([], dtype=int)) == 0.0


def test_recall_by_hand() -> None:
    ranked = np.array([5, 1, 7, 2])
    relevant = np.array([1, 2, 9])
    assert recall_at_k(ranked, relevant, k=2) == pytest.approx(1 / 2)  # 1 hit / min(2, 3)
    assert recall_at_k(ranked, relevant, k=4) == pytest.approx(2 / 3)  # 2 hits / min(4, 3)
    # 25 relevant items, the top 20 all hit: recall is 20 / min(20, 25) = 1.
    assert recall_at_k(np.arange(20), np.arange(25), k=20) == pytest.approx(1.0)


def random_split(seed: int = 0, n_users: int = 40, n_items: int = 30) -> Split:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        items = rng.choice(n_items, size=int(rng.integers(3, 15)), replace=False)
        rows += [(f"u{u}", f"i{i}", int(t)) for t, i in enumerate(items)]
    return protocol_split(frame(rows))


def test_evaluate_scores_matches_per_user_functions() -> None:
    split = random_split()
    scores = np.random.default_rng(1).integers(0, 4, size=(split.n_users, split.n_items))
    scores = scores.astype(np.float32)
    ranked = top_k(scores, 20, split.train)
    expected_ndcg = np.mean([ndcg_at_k(r, t, 10) for r, t in zip(ranked, split.test, strict=True)])
    expected_recall = np.mean(
        [recall_at_k(r, t, 20) for r, t in zip(ranked, split.test, strict=True)]
    )
    result = evaluate_scores(scores, split)
    assert result["ndcg@10"] == pytest.approx(expected_ndcg)
    assert result["recall@20"] == pytest.approx(expected_recall)
    assert result["users"] == split.n_users
    per_user = per_user_metrics(scores, split)
    assert per_user["ndcg@10"].shape == (split.n_users,)


def test_evaluate_scores_perfect_ranking_and_shape_check() -> None:
    split = random_split()
    perfect = np.zeros((split.n_users, split.n_items), dtype=np.float32)
    for row, items in enumerate(split.test):
        perfect[row, items] = 1.0
    result = evaluate_scores(perfect, split)
    assert result["ndcg@10"] == pytest.approx(1.0)
    assert result["recall@20"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        evaluate_scores(perfect[:, 1:], split)


# --- top-k ---------------------------------------------------------------------------------


def test_top_k_ties_by_column_index_and_exclusion() -> None:
    scores = np.array([[1.0, 2.0, 2.0, 2.0, 0.0]])
    assert top_k(scores, 2, None).tolist() == [[1, 2]]
    exclude = sp.csr_matrix(np.array([[0, 1, 0, 0, 0]]))
    assert top_k(scores, 2, exclude).tolist() == [[2, 3]]
    assert top_k(scores, 5, exclude).tolist() == [[2, 3, 0, 4, -1]]  # padded, 1 never shown


def test_top_k_never_returns_nan_or_excluded_items() -> None:
    scores = np.array([[np.nan, 3.0, 1.0], [5.0, 4.0, -np.inf]])
    exclude = sp.csr_matrix(np.array([[0, 1, 0], [1, 0, 0]]))
    assert top_k(scores, 3, exclude).tolist() == [[2, -1, -1], [1, -1, -1]]


def test_top_k_equals_stable_full_sort_under_heavy_ties() -> None:
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 5, size=(200, 60)).astype(np.float32)
    exclude = sp.random(200, 60, density=0.3, format="csr", random_state=3)
    exclude.data[:] = 1.0
    masked = np.where(exclude.toarray() > 0, -np.inf, scores)
    # Reference: full stable sort on descending score keeps column order within ties.
    expected = np.argsort(-masked, axis=1, kind="stable")[:, :10]
    assert np.array_equal(top_k(scores, 10, exclude), expected)
    assert not np.any(exclude.toarray()[np.arange(200)[:, None], top_k(scores, 10, exclude)])


# --- the split -----------------------------------------------------------------------------


def holder(n: int) -> list[tuple[str, str, int | None]]:
    """User z has items i0..i{n-1} early and 400 later ones, so its test cut (at most half)
    only takes the later ones and every i<n> stays in train."""
    return [("z", f"i{i}", 0) for i in range(n)] + [("z", f"x{i}", 1) for i in range(400)]


@pytest.mark.parametrize(
    ("n", "expected_test"),
    [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (7, 1), (8, 2), (12, 2), (13, 3)],
)
def test_split_rounds_twenty_percent_at_least_one(n: int, expected_test: int) -> None:
    split = protocol_split(frame([("a", f"i{i}", i) for i in range(n)] + holder(n)))
    assert history(split, "a", "test") == [f"i{i}" for i in range(n - expected_test, n)]


def test_split_rounds_half_up() -> None:
    rows = [("a", f"i{i}", i) for i in range(5)] + holder(5)
    split = protocol_split(frame(rows), test_frac=0.5)  # 2.5 rounds up to 3
    assert history(split, "a", "test") == ["i2", "i3", "i4"]


def test_split_protocol_rules() -> None:
    rows = [
        # a: chronological, not file order; the last timestamp is a tie broken by item id,
        # numerically: 9 < 10, so "10" is last (as strings, "10" < "9" would make "9" last).
        ("a", "3", 30),
        ("a", "1", 10),
        ("a", "2", 20),
        ("a", "4", 40),
        ("a", "10", 50),
        ("a", "9", 50),
        # b: the test item 99 occurs in nobody's train: dropped, and b is skipped.
        ("b", "1", 1),
        ("b", "2", 2),
        ("b", "3", 3),
        ("b", "4", 4),
        ("b", "99", 5),
        # c: no timestamps, so file order: "4" is train and "1" test.
        ("c", "4", None),
        ("c", "1", None),
        # d: a single interaction is all test; d is evaluated with an empty history.
        ("d", "2", 7),
        # e: puts "10" in train; its own test item is "4".
        ("e", "10", 1),
        ("e", "1", 2),
        ("e", "2", 3),
        ("e", "3", 4),
        ("e", "4", 5),
        # f: the test item repeats one of f's own train items: unrankable, dropped; f skipped.
        ("f", "1", 1),
        ("f", "2", 2),
        ("f", "3", 3),
        ("f", "4", 4),
        ("f", "1", 5),
    ]
    split = protocol_split(frame(rows))
    assert split.users == ["a", "c", "d", "e"]
    assert history(split, "a") == ["1", "2", "3", "4", "9"]
    assert history(split, "a", "test") == ["10"]
    assert history(split, "c") == ["4"]
    assert history(split, "c", "test") == ["1"]
    assert history(split, "d") == []
    assert split.items == ["1", "10", "2", "3", "4", "9"]  # train items, sorted as text
    assert [t.tolist() for t in split.test] == [[1], [0], [2], [4]]
    assert split.train.shape == (4, 6)
    assert split.train.toarray()[2].sum() == 0  # d
    assert split.train.toarray()[0].tolist() == [1, 0, 1, 1, 1, 1]  # a: 1, 2, 3, 4, 9
    # Skipped users b and f still train the models, after the evaluated users.
    assert split.fit.shape == (6, 6)
    assert np.array_equal(split.fit[:4].toarray(), split.train.toarray())
    notes = " ".join(split.notes)
    assert "1 test interactions dropped: item never occurs in train" in notes
    assert "1 test interactions dropped: item already in user's train" in notes
    assert "4 users evaluated, 2 skipped" in notes


def test_split_keeps_nothing_when_every_test_item_is_new() -> None:
    rows = [("a", str(i), i) for i in range(1, 6)] + [("b", str(i), i) for i in range(1, 6)]
    split = protocol_split(frame(rows))  # both hold out item 5, which then is in no train
    assert split.users == []
    assert split.fit.shape == (2, 4)
    assert evaluate_scores(np.zeros((0, 4)), split)["users"] == 0


def test_split_errors() -> None:
    with pytest.raises(InputError, match="missing column 'item_id'"):
        protocol_split(pd.DataFrame({"user_id": ["a"]}))
    with pytest.raises(InputError, match="no rows"):
        protocol_split(frame([]))
    with pytest.raises(ValueError, match="test_frac"):
        protocol_split(frame([("a", "1", 1)]), test_frac=1.0)


def test_validation_split_cuts_the_train_part_the_same_way() -> None:
    split = random_split(seed=4)
    validation = validation_split(split)
    assert validation.track == "validation"
    again = protocol_split(split.train_frames)
    assert validation.users == again.users
    assert validation.items == again.items
    for user in validation.users:
        train_items = history(split, user)
        val_train = history(validation, user)
        # Validation train is a chronological prefix of the train part; the validation
        # test items come from the train part only.
        assert val_train == train_items[: len(val_train)]
        assert set(history(validation, user, "test")) <= set(train_items)
    assert set(validation.items) <= set(split.items)


def test_cold_split_keeps_first_three_known_items_and_the_test_sets() -> None:
    rows = [("a", f"i{i}", 10 - i) for i in range(10)] + holder(10)  # a: i9, i8, ..., i0
    split = protocol_split(frame(rows))
    cold = cold_split(split, known=3)
    assert history(cold, "a") == ["i9", "i8", "i7"]
    assert cold.users == split.users
    assert cold.items == split.items
    assert [t.tolist() for t in cold.test] == [t.tolist() for t in split.test]
    col = {item: j for j, item in enumerate(cold.items)}
    row = cold.users.index("a")
    assert sorted(cold.train[row].indices.tolist()) == sorted(col[i] for i in ["i9", "i8", "i7"])
    assert cold.fit is split.fit  # the population keeps its full train
    assert cold.track == "cold-3"
    assert cold.folds is not None and sorted(cold.folds.tolist()) == sorted(
        (np.arange(len(cold.users)) % 5).tolist()
    )
    with pytest.raises(ValueError, match="warm or validation split"):
        cold_split(cold)


def test_stacked_cold_split_repeats_users_per_cut_with_shared_folds() -> None:
    rows = [(u, f"i{i}", i) for u in ("a", "b", "c") for i in range(10)] + holder(10)
    split = protocol_split(frame(rows))
    stacked = stacked_cold_split(split, (2, 3), folds=2, seed=1)
    n = len(split.users)
    assert stacked.users == split.users * 2 and stacked.fit is split.fit
    assert np.diff(stacked.train.indptr)[:n].tolist() == [2] * n
    assert np.diff(stacked.train.indptr)[n:].tolist() == [3] * n
    assert stacked.folds is not None
    assert stacked.folds[:n].tolist() == stacked.folds[n:].tolist()
    assert [t.tolist() for t in stacked.test] == [t.tolist() for t in split.test] * 2
    with pytest.raises(ValueError, match="at least one"):
        stacked_cold_split(split, ())


def test_fold_scores_never_fit_on_the_scored_users_train() -> None:
    # Only a has "solo" in train. Test items: a → w, b and c → v, e → w (ties by item id).
    rows = [("a", "solo", 1), ("a", "x", 2), ("a", "y", 3), ("a", "z", 4), ("a", "w", 5)]
    rows += [(u, item, t) for u in ("b", "c") for t, item in enumerate("xyzwv", start=1)]
    rows += [("e", item, 9) for item in ("w", "v", "q", "r", "s", "t")]
    split = protocol_split(frame(rows))
    assert split.users == ["a", "b", "c", "e"]
    cold = cold_split(split, known=3, folds=2, seed=0)
    solo = cold.items.index("solo")
    seen_rows: list[list[int]] = []

    def popularity(fit_rows: np.ndarray, user_rows: np.ndarray) -> np.ndarray:
        seen_rows.append(sorted(set(fit_rows.tolist()) & set(user_rows.tolist())))
        counts = np.asarray(cold.fit[fit_rows].sum(axis=0)).ravel()
        return np.tile(counts, (len(user_rows), 1))

    cold_scores = fold_scores(cold, popularity)
    assert all(overlap == [] for overlap in seen_rows)  # no user in their own fit
    assert len(seen_rows) == 2
    a = cold.users.index("a")
    assert cold_scores[a, solo] == 0  # only a's own row has "solo"
    warm_scores = fold_scores(split, popularity)
    assert warm_scores[a, solo] == 1  # warm: one model on everyone


def test_subsample_is_seeded_and_consistent() -> None:
    split = random_split(seed=5)
    first = subsample(split, 10, seed=3)
    assert first.users == subsample(split, 10, seed=3).users
    assert len(first.users) == 10
    for user, items in zip(first.users, first.test, strict=True):
        assert items.tolist() == split.test[split.users.index(user)].tolist()
    assert first.train.shape == (10, split.n_items)
    assert np.array_equal(first.fit[:10].toarray(), first.train.toarray())
    assert first.fit.shape == split.fit.shape
    assert subsample(split, 10_000, seed=3) is split
