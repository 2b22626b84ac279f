"""Newcomer signals (#13): ``category_pop`` by hand, its save/load, the chat weight groups,
and the chat track's record of what each simulated chat told."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from segrec.quality import _ChatState
from segrec.ranker import (
    CHAT_ITEMS,
    Ranker,
    RankerSpec,
    category_matrix,
    category_popularity,
    chat_group,
    history_categories,
)
from segrec.recommend import RandomWalk

# Items 0..3: counts 9, 3, 0, 1; categories A, A+B, B, C.
CATEGORIES = [["A"], ["A", "B"], ["B"], ["C"]]
X = sp.csr_matrix(
    np.array(
        [[1, 1, 0, 0]] * 3 + [[1, 0, 0, 0]] * 6 + [[0, 0, 0, 1]],
        dtype=np.float32,
    )
)
L9, L3, L1 = np.log1p(9.0), np.log1p(3.0), np.log1p(1.0)


def spec(**weights: dict[str, float]) -> RankerSpec:
    return RankerSpec(weights={"long": {"pop": 1.0}, "short": {"pop": 1.0}, **weights})


def test_category_matrix_columns_are_sorted_and_deduplicated() -> None:
    matrix, names = category_matrix([["B", "A", "B"], [], ["C"]])
    assert names == ["A", "B", "C"]
    np.testing.assert_array_equal(matrix.toarray(), [[1, 1, 0], [0, 0, 0], [0, 0, 1]])


def test_category_popularity_by_hand() -> None:
    C, names = category_matrix(CATEGORIES)
    counts = np.asarray(X.sum(axis=0)).ravel()
    assert list(counts) == [9, 3, 0, 1] and names == ["A", "B", "C"]
    users = sp.csr_matrix(
        np.array(
            [
                [1, 0, 0],  # likes A
                [1, 1, -1],  # likes A and B, dislikes C
                [0, 0, 0],  # told nothing
                [0, 0, -1],  # dislikes C only
            ],
            dtype=np.float32,
        )
    )
    got = category_popularity(counts, C, users)
    expected = [
        [L9, L3, 0, 0],
        [L9, 2 * L3, 0, -L1],  # item 1 is in both liked categories; item 2 has count 0
        [0, 0, 0, 0],
        [0, 0, 0, -L1],
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_history_categories_are_the_shares_of_the_known_items() -> None:
    C, _ = category_matrix(CATEGORIES)
    known = sp.csr_matrix(np.array([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=np.float32))
    shares = history_categories(known, C).toarray()
    np.testing.assert_allclose(shares, [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    counts = np.asarray(X.sum(axis=0)).ravel()
    got = category_popularity(counts, C, history_categories(known, C))
    # item 0: A (0.5) → 0.5·log1p(9); item 1: A+B (1.0) → log1p(3); item 3: C, not liked.
    np.testing.assert_allclose(got[0], [0.5 * L9, L3, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(got[1], 0.0)


def test_the_ranker_signal_uses_what_the_user_told_else_their_history() -> None:
    ranker = Ranker(spec(), names=["pop", "category_pop"], categories=CATEGORIES).fit(X)
    known = sp.csr_matrix(np.array([[0, 0, 0, 1]], dtype=np.float32))  # knows a C item
    from_history = ranker.signals(known, names=["category_pop"])["category_pop"]
    np.testing.assert_allclose(from_history, [[0, 0, 0, L1]], rtol=1e-6)
    told = ranker.category_row(["B", "Nope"], ["A"])  # unknown names are ignored
    np.testing.assert_array_equal(told.toarray(), [[-1, 1, 0]])
    said = ranker.signals(known, names=["category_pop"], user_categories=told)["category_pop"]
    np.testing.assert_allclose(said, [[-L9, -L3, 0, 0]], rtol=1e-6)  # dislike beats like
    # Blended with popularity, the told taste reorders the catalogue: B first.
    recs = Ranker(
        spec(chat={"pop": 0.2, "category_pop": 1.0}),
        names=["pop", "category_pop"],
        categories=CATEGORIES,
    ).fit(X)
    top = recs.recommend(
        sp.csr_matrix((1, 4), dtype=np.float32),
        4,
        groups=np.array(["chat"]),
        user_categories=ranker.category_row(["C"]),
    )
    assert top.indices[0][0] == 3  # the only C item, though item 0 is the most popular


def test_without_categories_the_signal_is_constant_and_adds_nothing() -> None:
    weights = spec(short={"pop": 1.0, "category_pop": 2.0})
    known = sp.csr_matrix(np.array([[0, 0, 0, 1]], dtype=np.float32))
    pop_only = Ranker(spec(), names=["pop"]).fit(X).recommend(known, 3)
    for categories in (None, [[], [], [], []]):
        ranker = Ranker(weights, categories=categories).fit(X)
        signal = ranker.signals(known, names=["category_pop"])["category_pop"]
        np.testing.assert_array_equal(signal, 0.0)
        assert ranker.category_row(["A"]).shape == (1, 0)
        blended = ranker.recommend(known, 3)
        np.testing.assert_array_equal(blended.indices, pop_only.indices)
        np.testing.assert_array_equal(blended.contributions["category_pop"], 0.0)


def test_category_state_survives_save_and_load() -> None:
    weights = spec(chat={"pop": 1.0, "category_pop": 1.0})
    ranker = Ranker(weights, categories=CATEGORIES).fit(X)
    arrays = ranker.arrays()
    assert list(arrays["category_names"]) == ["A", "B", "C"]
    loaded = Ranker.from_arrays(weights, None, arrays)
    known = sp.csr_matrix(np.array([[0, 1, 0, 0]], dtype=np.float32))
    told = loaded.category_row(["C"], ["A"])
    for user_categories in (None, told):
        a = ranker.signals(known, user_categories=user_categories)
        b = loaded.signals(known, user_categories=user_categories)
        np.testing.assert_array_equal(a["category_pop"], b["category_pop"])
    bare = Ranker(weights).fit(X)
    assert "category_names" not in bare.arrays()
    reloaded = Ranker.from_arrays(weights, None, bare.arrays())
    np.testing.assert_array_equal(reloaded.signals(known)["category_pop"], 0.0)


def test_chat_group_by_what_was_told() -> None:
    both = {"long": {}, "short": {}, "chat": {}, "chat_start": {}}
    assert chat_group(0, False, both, 5) == "short"
    assert chat_group(0, True, both, 5) == "chat_start"  # a category alone
    assert chat_group(CHAT_ITEMS - 1, True, both, 5) == "chat_start"
    assert chat_group(CHAT_ITEMS, True, both, 5) == "chat"
    old = {"long": {}, "short": {}, "chat": {}}  # a spec tuned before chat_start existed
    assert chat_group(1, True, old, 5) == "chat"
    assert chat_group(1, True, {"long": {}, "short": {}}, 5) == "short"
    assert chat_group(7, True, {"long": {}, "short": {}}, 5) == "long"


def test_the_chat_track_state_groups_users_as_the_session_would() -> None:
    liked = sp.csr_matrix(np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 0]], np.float32))
    categories = sp.csr_matrix(np.array([[0, 0], [0, 0], [1, 0], [0, -1]], np.float32))
    state = _ChatState(liked, np.full(4, -1), np.zeros((4, 2), np.float32), categories)
    np.testing.assert_array_equal(state.told, [False, True, True, True])
    weights = spec(chat={"ease": 1.0}, chat_start={"pop": 1.0})
    assert list(state.groups(weights)) == ["short", "chat_start", "chat", "chat_start"]


def test_random_walk_by_hand() -> None:
    # users: u0 {0, 1}, u1 {0, 1, 2, 3}, u2 {1, 2}; items 0..3 seen by 2, 3, 2, 1 users.
    X = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=np.float32))
    walk = RandomWalk().fit(X).walk
    assert walk is not None
    # From item 0: to u0 or u1 (1/2 each); u0 goes to 1 (1/2), u1 to 1, 2, 3 (1/4 each).
    np.testing.assert_allclose(walk.toarray()[0], [0, 1 / 4 + 1 / 8, 1 / 8, 1 / 8], rtol=1e-6)
    # Items 2 and 3 tie from item 0 (both only through u1's 4-item history); β = 1 divides
    # by their popularity (2 and 1 users), so the rarer item 3 ranks above item 2.
    penalised = RandomWalk(beta=1.0).fit(X).walk
    assert penalised is not None
    np.testing.assert_allclose(
        penalised.toarray()[0], [0, (1 / 4 + 1 / 8) / 3, 1 / 8 / 2, 1 / 8 / 1], rtol=1e-6
    )
    known = sp.csr_matrix(np.array([[1, 0, 0, 0]], dtype=np.float32))
    np.testing.assert_allclose(RandomWalk().fit(X).score(known), walk.toarray()[:1], rtol=1e-6)
    top1 = RandomWalk(neighbours=1).fit(X).walk
    assert top1 is not None and np.count_nonzero(top1.toarray()[0]) == 1  # item 1 kept


def test_random_walk_signal_survives_save_and_load() -> None:
    weights = spec(short={"rp3": 1.0})
    ranker = Ranker(weights).fit(X)
    assert "rp3" in ranker.names
    loaded = Ranker.from_arrays(weights, None, ranker.arrays())
    known = sp.csr_matrix(np.array([[0, 1, 0, 0]], dtype=np.float32))
    np.testing.assert_array_equal(ranker.signals(known)["rp3"], loaded.signals(known)["rp3"])
    assert loaded.recommend(known, 2).indices[0][0] == 0  # item 0 co-occurs with item 1


def test_tuning_offers_category_pop_only_where_items_have_categories() -> None:
    from test_serving import _random_log

    from segrec.evaluate import Split, protocol_split
    from segrec.ranker import tune_ranker

    split = protocol_split(_random_log(3, users=80))

    def blocks(part: Split) -> list[tuple[str, ...]]:
        return [(f"block{int(i[1:]) // 20}",) for i in part.items]

    def empty(part: Split) -> list[tuple[str, ...]]:
        return [() for _ in part.items]

    with_categories = tune_ranker(split, item_vectors_for=None, categories_for=blocks)
    assert "category_pop" in with_categories.validation["short"]["single_signals"]
    without = tune_ranker(split, item_vectors_for=None, categories_for=empty)
    assert "category_pop" not in without.validation["short"]["single_signals"]
    assert "category_pop" not in without.signals
