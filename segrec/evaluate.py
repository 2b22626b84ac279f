"""The offline evaluation protocol (shared/eval/PROTOCOL.md): split, ranking and metrics.

Pure functions over pandas/numpy/scipy, so `segrec eval`, the benchmarks and the tests all
compute every figure the same way. Nothing here touches the workspace or prints.

Conventions that make figures reproducible:

* Per user, interactions are ordered by timestamp, ties by item id (numerically when every
  item id is an integer, as with MovieLens, otherwise as text); a user with any missing
  timestamp is ordered by file order (``line``) instead.
* The last ``round(test_frac * n)`` interactions (at least 1) are test. Rounding is half up;
  with the protocol's 0.2 the product is never exactly x.5, so half-up and half-to-even
  (Python's ``round``) give identical splits.
* Rows are users in order of first appearance; columns are the train items sorted by id as
  text. Ties in scores go to the lower column index, so rankings are deterministic.

The tie rules matter: MostPop's scores tie a lot, and these choices (numeric ties in the
split, text-sorted columns) reproduce all six PROTOCOL reference figures to four decimals;
text ties in the split move ItemKNN's Recall@20 by 0.0012, numeric column order MostPop's
by 0.0004.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from segrec.errors import InputError

REQUIRED_COLUMNS = ("user_id", "item_id")


@dataclass
class Split:
    """One evaluation track: who is scored, on which catalogue, against which test items.

    Score with `fold_scores` (models fit on rows of ``fit``: once, or per fold on the cold
    track), exclude seen items with ``train``, compare with ``test``. Score matrices are
    ``(len(users), len(items))`` with rows in ``users`` order.
    """

    users: list[str]
    """Evaluated users: each has at least one test item that occurs in train."""
    items: list[str]
    """The rankable catalogue (items occurring in train), in column order."""
    train: sp.csr_matrix
    """Binary ``(len(users), len(items))``: each evaluated user's known history."""
    test: list[np.ndarray]
    """Per evaluated user, the sorted column indices of their test items."""
    train_frames: pd.DataFrame
    """Train interactions (user_id, item_id, value, timestamp, line) in protocol order: every
    user's on the warm track, the evaluated users' known ones on the cold track."""
    test_frames: pd.DataFrame
    """The test interactions that are scored (dropped ones removed)."""
    fit: sp.csr_matrix
    """Binary matrix to fit models on: every user's full train; the first ``len(users)`` rows
    are the evaluated users (for the warm track ``fit[:len(users)]`` equals ``train``), the rest
    are users with train but no usable test item (or not in a sample)."""
    test_frac: float = 0.2
    track: str = "warm"
    folds: np.ndarray | None = None
    """Cold track: per evaluated user, the fold whose models must not see that user's train
    (see `fold_scores`). None: one model fit on all of ``fit`` scores everyone."""
    notes: list[str] = field(default_factory=list)
    """Human-readable facts about how the split was made (for reports)."""
    fit_users: list[str] = field(default_factory=list)
    """The user of each row of ``fit`` (evaluated users first, in ``users`` order)."""
    fit_time: sp.csr_matrix | None = None
    """Same sparsity as ``fit``: when each pair first occurred (protocol time: the timestamp,
    or the line for a user without timestamps; shifted so the earliest event is 1). What
    order- and time-aware models read; it holds train events only, like ``fit``."""
    train_time: sp.csr_matrix | None = None
    """Same for ``train``: the known history's times (its last one is "now" for the user)."""

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)


def protocol_split(interactions: pd.DataFrame, *, test_frac: float = 0.2) -> Split:
    """Split per user, chronologically: the last ``test_frac`` of each history is test.

    Test items that never occur in train are dropped, and so are test items the user already
    has in train (repeat consumption: they are excluded from the ranking, so no method could
    ever hit them). Users left with no test item are skipped but still train the models.
    """
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    frame = _normalise(interactions)
    ordered = _protocol_order(frame)

    position = ordered.groupby("user_id", sort=False).cumcount().to_numpy()
    length = ordered.groupby("user_id", sort=False)["item_id"].transform("size").to_numpy()
    n_test = np.maximum(1, np.floor(test_frac * length + 0.5)).astype(np.int64)
    is_test = position >= length - n_test

    train = ordered.loc[~is_test]
    test = ordered.loc[is_test]
    shift = int(train["time"].min()) - 1 if len(train) else 0
    n_candidates = test["user_id"].nunique()

    items = sorted(pd.unique(train["item_id"]))
    item_index = pd.Index(items)
    known_pairs = pd.MultiIndex.from_frame(train[["user_id", "item_id"]])
    test_pairs = pd.MultiIndex.from_frame(test[["user_id", "item_id"]])
    keep = item_index.get_indexer(test["item_id"]) >= 0
    keep &= ~test_pairs.isin(known_pairs)
    n_not_in_train = int((item_index.get_indexer(test["item_id"]) < 0).sum())
    n_repeats = int(len(test) - n_not_in_train - keep.sum())
    test = test.loc[keep].drop_duplicates(["user_id", "item_id"])

    user_order = pd.unique(frame["user_id"])
    evaluated = set(test["user_id"])
    users = [u for u in user_order if u in evaluated]
    others = [u for u in pd.unique(train["user_id"]) if u not in evaluated]
    user_index = pd.Index(users + others)
    fit = _binary_matrix(train, user_index, item_index)
    fit_time = _time_matrix(train, user_index, item_index, shift)

    notes = [
        f"{len(frame)} interactions, {frame['user_id'].nunique()} users; "
        f"last {test_frac:g} of each user's history (rounded half up, at least 1) is test",
        f"{n_not_in_train} test interactions dropped: item never occurs in train",
        f"{len(users)} users evaluated, {n_candidates - len(users)} skipped (no test item left)",
    ]
    if n_repeats:
        notes.insert(2, f"{n_repeats} test interactions dropped: item already in user's train")
    return Split(
        users=users,
        items=items,
        train=fit[: len(users)],
        test=_per_user_columns(test, pd.Index(users), item_index),
        train_frames=train.reset_index(drop=True),
        test_frames=test.reset_index(drop=True),
        fit=fit,
        test_frac=test_frac,
        track="warm",
        notes=notes,
        fit_users=list(user_index),
        fit_time=fit_time,
        train_time=fit_time[: len(users)],
    )


def validation_split(split: Split) -> Split:
    """The same cut applied to the train part (its last ``test_frac``), to tune on.

    λ and blend weights chosen here never see the test items.
    """
    if split.track != "warm":
        raise ValueError("validation_split needs a warm split (the full train histories)")
    validation = protocol_split(split.train_frames, test_frac=split.test_frac)
    validation.track = "validation"
    return validation


def cold_split(split: Split, known: int = 3, *, folds: int = 5, seed: int = 0) -> Split:
    """PROTOCOL track 2: same test sets, but each user's history is their first ``known``
    train interactions (chronological, distinct items).

    The catalogue stays the full train catalogue, only the known items are excluded, and the
    population keeps its full train: a new user joins an established service. A model that
    scores a user must not have seen that user's later train items, though (it would push
    those non-relevant items up, costing EASE a third of its NDCG), so evaluated users are
    dealt into ``folds`` seeded folds and `fold_scores` fits one model per fold without it.
    """
    if split.track not in ("warm", "validation"):
        raise ValueError("cold_split needs a warm or validation split (full train histories)")
    if known < 0:
        raise ValueError(f"known must be >= 0, got {known}")
    if folds < 2:
        raise ValueError(f"folds must be >= 2 (users are left out of their own fit), got {folds}")
    user_index = pd.Index(split.users)
    history = split.train_frames.loc[split.train_frames["user_id"].isin(user_index)]
    history = history.drop_duplicates(["user_id", "item_id"])
    history = history.groupby("user_id", sort=False).head(known).reset_index(drop=True)
    shift = int(split.train_frames["time"].min()) - 1 if len(split.train_frames) else 0
    return Split(
        users=list(split.users),
        items=list(split.items),
        train=_binary_matrix(history, user_index, pd.Index(split.items)),
        test=[t.copy() for t in split.test],
        train_frames=history,
        test_frames=split.test_frames.copy(),
        fit=split.fit,
        test_frac=split.test_frac,
        track=f"cold-{known}",
        folds=np.random.default_rng(seed).permutation(len(split.users)) % folds,
        notes=[
            *split.notes,
            f"cold track: history cut to the first {known} train items; models fit in "
            f"{folds} folds of users (seed {seed}), never on the scored user's train",
        ],
        fit_users=list(split.fit_users),
        fit_time=split.fit_time,
        train_time=_time_matrix(history, user_index, pd.Index(split.items), shift),
    )


def stacked_cold_split(
    split: Split, knowns: Sequence[int], *, folds: int = 5, seed: int = 0
) -> Split:
    """Several cold cuts of the same users stacked as one split (rows repeat per cut).

    Tuning for "users with a short history" on one cut length is noisy; stacking the cuts
    that group spans averages over them. The cuts share the fold assignment, so
    `fold_scores` fits one model per fold for all of them.
    """
    if not knowns:
        raise ValueError("stacked_cold_split needs at least one cut length")
    cuts = [cold_split(split, known, folds=folds, seed=seed) for known in knowns]
    first = cuts[0]
    return Split(
        users=[u for cut in cuts for u in cut.users],
        items=list(first.items),
        train=sp.csr_matrix(sp.vstack([cut.train for cut in cuts])),
        test=[t for cut in cuts for t in cut.test],
        train_frames=pd.concat([cut.train_frames for cut in cuts], ignore_index=True),
        test_frames=first.test_frames,
        fit=first.fit,
        test_frac=first.test_frac,
        track="cold-" + "+".join(str(k) for k in knowns),
        folds=np.concatenate([cut.folds for cut in cuts if cut.folds is not None]),
        notes=[*split.notes, f"cold cuts of {', '.join(map(str, knowns))} items stacked"],
        fit_users=list(first.fit_users),
        fit_time=first.fit_time,
        train_time=sp.csr_matrix(sp.vstack([cut.train_time for cut in cuts])),
    )


def fold_rows(split: Split) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows of ``fit`` to fit on, evaluated users to score) pairs: one pair with every row
    on the warm and validation tracks, one per fold on the cold track (each fold's users
    left out of its fit)."""
    fit_rows = np.arange(split.fit.shape[0])
    user_rows = np.arange(len(split.users))
    if split.folds is None or not split.users:
        yield fit_rows, user_rows
        return
    for fold in np.unique(split.folds):
        members = np.flatnonzero(split.folds == fold)
        yield np.setdiff1d(fit_rows, members), members


def fold_scores(split: Split, score: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Scores for every evaluated user from models that never saw that user's hidden history.

    ``score(fit_rows, user_rows)`` fits on ``split.fit[fit_rows]`` and returns scores for
    ``split.train[user_rows]`` (see `fold_rows`).
    """
    parts = [(users, np.asarray(score(fit, users))) for fit, users in fold_rows(split)]
    first = parts[0][1]
    scores = np.empty((len(split.users), first.shape[1]), dtype=first.dtype)
    for members, part in parts:
        scores[members] = part
    return scores


def subsample(split: Split, n: int, *, seed: int) -> Split:
    """A seeded random sample of ``n`` evaluated users (for slow methods such as LLM
    profiling); ``fit`` keeps the whole population, sampled users first. Score every method
    on the same sample."""
    if n >= len(split.users):
        return split
    rows = np.sort(np.random.default_rng(seed).choice(len(split.users), size=n, replace=False))
    rest = np.setdiff1d(np.arange(split.fit.shape[0]), rows)
    order = np.concatenate([rows, rest])
    users = [split.users[r] for r in rows]
    chosen = pd.Index(users)
    return Split(
        users=users,
        items=list(split.items),
        train=split.train[rows],
        test=[split.test[r] for r in rows],
        train_frames=split.train_frames,
        test_frames=split.test_frames.loc[split.test_frames["user_id"].isin(chosen)],
        fit=sp.csr_matrix(split.fit[order]),
        test_frac=split.test_frac,
        track=split.track,
        folds=None if split.folds is None else split.folds[rows],
        notes=[*split.notes, f"random sample of {n} of {len(split.users)} users, seed {seed}"],
        fit_users=[split.fit_users[i] for i in order] if split.fit_users else [],
        fit_time=None if split.fit_time is None else sp.csr_matrix(split.fit_time[order]),
        train_time=None if split.train_time is None else split.train_time[rows],
    )


def ndcg_at_k(ranked: np.ndarray, relevant: np.ndarray, k: int = 10) -> float:
    """Binary-relevance NDCG@k; the ideal DCG is over min(k, |relevant|) items."""
    relevant = np.unique(np.asarray(relevant))
    if relevant.size == 0:
        return 0.0
    top = np.asarray(ranked)[:k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float(discounts[: top.size][np.isin(top, relevant)].sum())
    idcg = float(discounts[: min(k, relevant.size)].sum())
    return dcg / idcg


def recall_at_k(ranked: np.ndarray, relevant: np.ndarray, k: int = 20) -> float:
    """Hits in the top k divided by min(k, |relevant|), so a perfect ranking scores 1."""
    relevant = np.unique(np.asarray(relevant))
    if relevant.size == 0:
        return 0.0
    hits = int(np.isin(np.asarray(ranked)[:k], relevant).sum())
    return hits / min(k, relevant.size)


def top_k(
    scores: np.ndarray,
    k: int,
    exclude: sp.csr_matrix | None = None,
    *,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """Column indices of the k best items per row, best first, ties by lower column index.

    Items in ``exclude`` (typically the user's train items), items outside the boolean mask
    ``allowed`` (per item, or per user × item) and items scored NaN or -inf are never
    returned; a row with fewer than k other items is padded with -1.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return _top_k_of(_recommendable(scores, exclude, allowed), k)


def evaluate_scores(
    scores: np.ndarray, split: Split, *, exclude_train: bool = True
) -> dict[str, float]:
    """Mean NDCG@10 and Recall@20 over the split's users, ranking the whole catalogue."""
    per_user = per_user_metrics(scores, split, exclude_train=exclude_train)
    return {
        "ndcg@10": float(per_user["ndcg@10"].mean()) if split.users else 0.0,
        "recall@20": float(per_user["recall@20"].mean()) if split.users else 0.0,
        "users": float(len(split.users)),
    }


def per_user_metrics(
    scores: np.ndarray, split: Split, *, exclude_train: bool = True
) -> dict[str, np.ndarray]:
    """Per-user NDCG@10 and Recall@20 (for significance tests and breakdowns)."""
    if scores.shape != (len(split.users), len(split.items)):
        raise ValueError(
            f"scores have shape {scores.shape}, the split needs "
            f"({len(split.users)}, {len(split.items)})"
        )
    ranked = top_k(scores, 20, split.train if exclude_train else None)
    return ranking_metrics(ranked, split.test, len(split.items))


def ranking_metrics(
    ranked: np.ndarray, test: Sequence[np.ndarray], n_items: int
) -> dict[str, np.ndarray]:
    """Per-user NDCG@10 / Recall@20 of top-20 column rankings (-1 pads), vectorised:
    membership of (user, item) keys in the test pairs."""
    n_users, depth = ranked.shape
    sizes = np.array([t.size for t in test], dtype=np.int64)
    test_rows = np.repeat(np.arange(n_users, dtype=np.int64), sizes)
    test_cols = np.concatenate([np.empty(0, np.int64), *test]).astype(np.int64)
    test_keys = test_rows * n_items + test_cols
    keys = np.arange(n_users, dtype=np.int64)[:, None] * n_items + ranked
    hits = np.isin(keys, test_keys) & (ranked >= 0)

    discounts = 1.0 / np.log2(np.arange(2, 12))
    ideal = np.concatenate([[0.0], np.cumsum(discounts)])
    dcg = (hits[:, : min(10, depth)] * discounts[: min(10, depth)]).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ndcg = np.where(sizes > 0, dcg / ideal[np.minimum(sizes, 10)], 0.0)
        recall = np.where(sizes > 0, hits[:, :20].sum(axis=1) / np.minimum(sizes, 20), 0.0)
    return {"ndcg@10": ndcg, "recall@20": recall}


def _recommendable(
    scores: np.ndarray, exclude: sp.csr_matrix | None, allowed: np.ndarray | None = None
) -> np.ndarray:
    """A float copy of the scores with -inf wherever an item must not be returned."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-d (users × items), got shape {scores.shape}")
    work = scores.astype(np.result_type(scores.dtype, np.float32), copy=True)
    work[np.isnan(work)] = -np.inf
    if exclude is not None:
        if exclude.shape != work.shape:
            raise ValueError(f"exclude has shape {exclude.shape}, scores {work.shape}")
        exclude = sp.csr_matrix(exclude)
        rows = np.repeat(np.arange(exclude.shape[0]), np.diff(exclude.indptr))
        work[rows, exclude.indices] = -np.inf
    if allowed is not None:
        allowed = np.asarray(allowed, dtype=bool)
        work[~np.broadcast_to(allowed, work.shape)] = -np.inf
    return work


def _top_k_of(work: np.ndarray, k: int) -> np.ndarray:
    """Top k of a prepared score matrix (see `_recommendable`), deterministic under ties.

    ``argpartition`` alone picks arbitrarily among items tied with the k-th score; rows where
    such a tie straddles the cut are redone by taking tied items in column order.
    """
    n_rows, n_items = work.shape
    depth = min(k, n_items)
    result = np.full((n_rows, k), -1, dtype=np.int64)
    if depth == 0 or n_rows == 0:
        return result
    cut = n_items - depth
    chosen = np.argpartition(work, cut, axis=1)[:, cut:]
    chosen_scores = np.take_along_axis(work, chosen, axis=1)
    threshold = chosen_scores.min(axis=1, keepdims=True)
    tied_total = np.count_nonzero(work == threshold, axis=1)
    tied_chosen = np.count_nonzero(chosen_scores == threshold, axis=1)
    straddling = np.flatnonzero(tied_total > tied_chosen)
    if straddling.size:
        sub = work[straddling]
        limit = threshold[straddling]
        above = sub > limit
        tied = sub == limit
        need = depth - above.sum(axis=1, keepdims=True)
        take = above | (tied & (np.cumsum(tied, axis=1) <= need))
        chosen[straddling] = np.nonzero(take)[1].reshape(-1, depth)
    chosen.sort(axis=1)
    chosen_scores = np.take_along_axis(work, chosen, axis=1)
    order = np.argsort(-chosen_scores, axis=1, kind="stable")
    best = np.take_along_axis(chosen, order, axis=1)
    best[np.take_along_axis(chosen_scores, order, axis=1) == -np.inf] = -1
    result[:, :depth] = best
    return result


def _normalise(interactions: pd.DataFrame) -> pd.DataFrame:
    """The columns the protocol needs, typed; ``line`` defaults to row order."""
    missing = [c for c in REQUIRED_COLUMNS if c not in interactions.columns]
    if missing:
        raise InputError(
            f"interactions: missing column {missing[0]!r}; "
            "map it with the column flags (e.g. --user-col userId)"
        )
    if interactions.empty:
        raise InputError("interactions: no rows to evaluate; check the behaviour log")
    n = len(interactions)
    frame = pd.DataFrame(
        {
            "user_id": interactions["user_id"].astype(str).to_numpy(),
            "item_id": interactions["item_id"].astype(str).to_numpy(),
            "value": (
                pd.to_numeric(interactions["value"], errors="coerce").to_numpy(dtype=float)
                if "value" in interactions
                else np.full(n, np.nan)
            ),
            "timestamp": (
                interactions["timestamp"].astype("Int64").to_numpy()
                if "timestamp" in interactions
                else pd.array([pd.NA] * n, dtype="Int64")
            ),
            "line": (
                interactions["line"].to_numpy(dtype=np.int64)
                if "line" in interactions
                else np.arange(n, dtype=np.int64)
            ),
        }
    )
    frame["timestamp"] = frame["timestamp"].astype("Int64")
    return frame.sort_values("line", kind="stable").reset_index(drop=True)


def _protocol_order(frame: pd.DataFrame) -> pd.DataFrame:
    """Users in first-appearance order; within a user, chronological (see module doc)."""
    user_code = pd.factorize(frame["user_id"])[0]
    incomplete = frame["timestamp"].isna().groupby(user_code).transform("any").to_numpy()
    time_key = np.where(
        incomplete, frame["line"].to_numpy(), frame["timestamp"].fillna(0).to_numpy(np.int64)
    )
    keys = pd.DataFrame(
        {
            "u": user_code,
            "t": time_key,
            "i": _item_sort_key(frame["item_id"]),
            "line": frame["line"],
        }
    )
    order = keys.sort_values(["u", "t", "i", "line"], kind="stable").index.to_numpy()
    return frame.assign(time=time_key).iloc[order].reset_index(drop=True)


def _item_sort_key(item_ids: pd.Series) -> np.ndarray:
    """Item ids as a sort key: numeric when every id is an integer (MovieLens), else text."""
    numeric = pd.to_numeric(item_ids, errors="coerce")
    if numeric.notna().all() and (numeric % 1 == 0).all():
        return numeric.to_numpy(dtype=np.float64)
    return pd.factorize(item_ids, sort=True)[0]


def _binary_matrix(frame: pd.DataFrame, users: pd.Index, items: pd.Index) -> sp.csr_matrix:
    """Binary user × item matrix (float32) of the frame's pairs, in the given row order."""
    rows = users.get_indexer(frame["user_id"])
    cols = items.get_indexer(frame["item_id"])
    ok = (rows >= 0) & (cols >= 0)
    matrix = sp.csr_matrix(
        (np.ones(int(ok.sum()), dtype=np.float32), (rows[ok], cols[ok])),
        shape=(len(users), len(items)),
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    matrix.sort_indices()
    return matrix


def event_times(
    interactions: pd.DataFrame, users: Sequence[str], items: Sequence[str]
) -> sp.csr_matrix:
    """When each (user, item) pair first happened, on the protocol's clock (see `Split.
    fit_time`), as a ``len(users) × len(items)`` matrix: what order-aware models fit on
    outside an evaluation (the serving ranker)."""
    frame = _protocol_order(_normalise(interactions))
    shift = int(frame["time"].min()) - 1
    return _time_matrix(frame, pd.Index(users), pd.Index(items), shift)


def _time_matrix(
    frame: pd.DataFrame, users: pd.Index, items: pd.Index, shift: int
) -> sp.csr_matrix:
    """Float64 user × item matrix of each pair's first protocol time minus ``shift`` (> 0)."""
    first = frame.drop_duplicates(["user_id", "item_id"])
    rows = users.get_indexer(first["user_id"])
    cols = items.get_indexer(first["item_id"])
    ok = (rows >= 0) & (cols >= 0)
    times = first["time"].to_numpy(dtype=np.float64)[ok] - shift
    matrix = sp.csr_matrix((times, (rows[ok], cols[ok])), shape=(len(users), len(items)))
    matrix.sort_indices()
    return matrix


def _per_user_columns(frame: pd.DataFrame, users: pd.Index, items: pd.Index) -> list[np.ndarray]:
    """Sorted column indices of each user's items, one array per user in ``users`` order."""
    rows = users.get_indexer(frame["user_id"])
    cols = items.get_indexer(frame["item_id"]).astype(np.int64)
    order = np.lexsort((cols, rows))
    counts = np.bincount(rows, minlength=len(users))
    return np.split(cols[order], np.cumsum(counts)[:-1])
