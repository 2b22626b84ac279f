"""Scorers (collaborative, popularity, content) and the blended ranker.

Every scorer maps a binary user × item history matrix to a dense float32 score matrix over
the same catalogue; the blend standardises each signal per user and adds them with weights
tuned on a validation split. Pure numpy/scipy: no workspace, no LLM, no printing.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol, Self, TypeVar

import numpy as np
import scipy.sparse as sp

from segrec.errors import ConfigError
from segrec.evaluate import Split, evaluate_scores, ranking_metrics, top_k, validation_split

EASE_LAMBDAS = (50.0, 100.0, 200.0, 500.0)
BLEND_GRID = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0)
TUNE_CANDIDATES = 50  # per signal and user, see `tune_blend`
# EASE's user-space form (`EASEDual`) keeps a users × users inverse: only for small populations.
EASE_DUAL_MAX_USERS = 4_096

T = TypeVar("T")


class Scorer(Protocol):
    """What the evaluator and the ranker rely on: fit on a history matrix, score users."""

    name: str

    def fit(self, X: sp.csr_matrix) -> Self: ...

    def score(self, X_users: sp.csr_matrix) -> np.ndarray: ...


class MostPop:
    """Train interaction counts (number of users per item on a binary matrix)."""

    name = "pop"

    def __init__(self) -> None:
        self.counts: np.ndarray | None = None

    def fit(self, X: sp.csr_matrix) -> Self:
        self.counts = np.asarray(X.sum(axis=0), dtype=np.float32).ravel()
        return self

    def score(self, X_users: sp.csr_matrix) -> np.ndarray:
        counts = _fitted(self.counts, self)
        return np.tile(counts, (X_users.shape[0], 1))


class ItemKNN:
    """Item–item cosine similarity on the binary matrix, score = X·S with S's diagonal zeroed.

    ``neighbours=None`` keeps every similarity (the PROTOCOL baseline); an integer keeps, for
    each item, only its most similar items, which bounds memory on big catalogues.

    With every similarity kept, S = XnᵀXn − diag (Xn: the fit matrix with unit columns), so
    a user's scores are also (x·Xnᵀ)·Xn − x∘diag: one pass over the fit matrix instead of
    one row of S per known item. Scoring takes, per user, whichever path touches fewer
    stored numbers (`score`): a long history over a small population (ml-latest-small's
    longest, 1,300 items × ~2,700 similarities each) costs ~30× less through the fit
    matrix, a short one over a large population costs less through S. Both give the same
    scores up to rounding (the factored path sums in float64).
    """

    name = "itemknn"

    def __init__(self, neighbours: int | None = None) -> None:
        if neighbours is not None and neighbours < 1:
            raise ValueError(f"neighbours must be >= 1 or None, got {neighbours}")
        self.neighbours = neighbours
        self.similarity: sp.csr_matrix | None = None
        # The factored path (neighbours=None only): Xn and the diagonal removed from S.
        self.normalised: sp.csr_matrix | None = None
        self.self_similarity: np.ndarray | None = None
        self._costs: tuple[np.ndarray, np.ndarray] | None = None  # see `score`

    def fit(self, X: sp.csr_matrix) -> Self:
        X = sp.csc_matrix(X, dtype=np.float32)
        norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=0)).ravel())
        inverse = reciprocal(norms)
        Xn = X @ sp.diags(inverse.astype(np.float32))
        S = sp.csc_matrix(Xn.T @ Xn)
        diagonal = S.diagonal().astype(np.float32)
        S = sp.csc_matrix(S - sp.diags(diagonal))
        S.eliminate_zeros()
        if self.neighbours is not None:
            S = _keep_top_per_column(S, self.neighbours)
        self.similarity = sp.csr_matrix(S, dtype=np.float32)
        self.normalised = self.self_similarity = self._costs = None
        # Kept when it is no bigger than S: then some histories are cheaper through it.
        if self.neighbours is None and Xn.nnz <= S.nnz:
            # float64: the factored sums run over whole histories (no S entry rounding)
            self.normalised = sp.csr_matrix(X @ sp.diags(inverse.astype(np.float64)))
            self.self_similarity = diagonal
        return self

    def score(self, X_users: sp.csr_matrix) -> np.ndarray:
        S = _fitted(self.similarity, self)
        X_users = sp.csr_matrix(X_users, dtype=np.float32)
        return _score_by_path(
            X_users,
            self.through_data(X_users),
            self._score_through_data,
            lambda part: np.asarray((part @ S).toarray()),
        )

    def _score_through_data(self, part: sp.csr_matrix) -> np.ndarray:
        """(x·Xnᵀ)·Xn − x∘diag for these users (see the class doc)."""
        Xn, diagonal = _fitted(self.normalised, self), _fitted(self.self_similarity, self)
        weights = Xn @ part.toarray().T  # fit users × scored users (csr × dense)
        scores = np.asarray(Xn.T @ weights).T  # csc × dense
        # S's diagonal was removed: take each known item's self-similarity back out.
        owner = np.repeat(np.arange(part.shape[0]), np.diff(part.indptr))
        scores[owner, part.indices] -= part.data * diagonal[part.indices]
        return scores.astype(np.float32)

    def through_data(self, X_users: sp.csr_matrix) -> np.ndarray:
        """Per user, whether `score` goes through the fit matrix: when its known items'
        columns there plus (an upper bound) the whole fit matrix once are fewer stored
        numbers than their rows of S."""
        S, Xn = _fitted(self.similarity, self), self.normalised
        X_users = sp.csr_matrix(X_users)
        if Xn is None:
            return np.zeros(X_users.shape[0], dtype=bool)
        if self._costs is None:
            self._costs = (
                np.diff(S.indptr).astype(np.float64),
                np.bincount(Xn.indices, minlength=Xn.shape[1]).astype(np.float64),
            )
        row_sizes, column_sizes = self._costs
        n_users = X_users.shape[0]
        owner = np.repeat(np.arange(n_users), np.diff(X_users.indptr))
        direct = np.bincount(owner, weights=row_sizes[X_users.indices], minlength=n_users)
        factored = np.bincount(owner, weights=column_sizes[X_users.indices], minlength=n_users)
        return factored + Xn.nnz < direct


class RandomWalk:
    """RP3beta (Paudel et al. 2017; Cooper et al. 2014's P³): the probability of reaching
    item j from item i in a two-step walk item → user → item over the binary matrix,
    W[i, j] = Σ_u X[u, i] X[u, j] / (|users of i| · |items of u|), divided by
    popularity(j)^β; zero diagonal; score = X·W.

    Dividing by the user's history length is what sets it apart from ItemKNN's cosine: a
    co-occurrence inside a short history counts more than one inside a thousand-item one.
    ``neighbours`` keeps each item's most likely next items only (memory on big catalogues,
    as for ItemKNN). β = 0 is the default: on the cold cuts of both benchmark logs β ≥ 0.3
    ranked worse alone (benchmarks/results/newcomers.md).
    """

    name = "rp3"

    def __init__(self, beta: float = 0.0, neighbours: int | None = None) -> None:
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if neighbours is not None and neighbours < 1:
            raise ValueError(f"neighbours must be >= 1 or None, got {neighbours}")
        self.beta = float(beta)
        self.neighbours = neighbours
        self.walk: sp.csr_matrix | None = None

    def fit(self, X: sp.csr_matrix) -> Self:
        X = sp.csr_matrix(X, dtype=np.float32)
        X.data[:] = 1.0
        per_user = np.asarray(X.sum(axis=1)).ravel()
        per_item = np.asarray(X.sum(axis=0)).ravel()
        inv_user, inv_item = reciprocal(per_user), reciprocal(per_item)
        to_users = sp.diags(inv_item.astype(np.float32)) @ sp.csr_matrix(X.T)
        to_items = sp.diags(inv_user.astype(np.float32)) @ X
        W = sp.csr_matrix(to_users @ to_items)
        if self.beta:
            penalty = np.power(np.maximum(per_item, 1.0), -self.beta).astype(np.float32)
            W = sp.csr_matrix(W @ sp.diags(penalty))
        W = sp.csr_matrix(W - sp.diags(W.diagonal()))
        W.eliminate_zeros()
        if self.neighbours is not None:  # each item's k likeliest next items (rows of W)
            W = sp.csr_matrix(_keep_top_per_column(sp.csc_matrix(W.T), self.neighbours).T)
        self.walk = sp.csr_matrix(W, dtype=np.float32)
        return self

    def score(self, X_users: sp.csr_matrix) -> np.ndarray:
        W = _fitted(self.walk, self)
        return np.asarray((sp.csr_matrix(X_users, dtype=np.float32) @ W).toarray())


class EASE:
    """EASE (Steck 2019): B = I − P·diag(1/diag(P)), P = (XᵀX + λI)⁻¹, diag(B) = 0.

    The inverse is computed in float32 by Cholesky (λ > 0 keeps XᵀX + λI well conditioned;
    on ml-latest-small float32 and float64 give identical NDCG/Recall to all digits, and
    float32 fits in half the time: ~7 s for 8k items on 2 cores). Memory and time grow with
    the catalogue: about 8·n_items² bytes while fitting and n³ flops — 9k items take ~0.7 GB,
    100k items would need ~80 GB, so the ranker leaves EASE out above ``EASE_MAX_ITEMS``.
    """

    name = "ease"

    def __init__(self, lam: float = 200.0) -> None:
        if lam <= 0:
            raise ValueError(f"EASE λ must be > 0, got {lam}")
        self.lam = float(lam)
        self.B: np.ndarray | None = None
        self.dual: EASEDual | None = None

    def fit(self, X: sp.csr_matrix) -> Self:
        X = sp.csr_matrix(X, dtype=np.float32)
        X.sort_indices()
        fits = _EASE_FITS.get()
        key = _matrix_key(X, self.lam) if fits is not None else None
        if fits is not None and key in fits:
            fits.move_to_end(key)
            self.B, self.dual = fits[key]
            return self
        # Fewer users than items: the user-space form scores long histories far cheaper.
        small = 0 < X.shape[0] <= min(X.shape[1], EASE_DUAL_MAX_USERS)
        self.dual = EASEDual.fit(X, self.lam) if small else None
        gram = (X.T @ X).toarray()
        gram[np.diag_indices_from(gram)] += self.lam
        P = _spd_inverse(gram)
        B = P / (-np.diag(P))[None, :]
        B[np.diag_indices_from(B)] = 0.0
        self.B = B.astype(np.float32, copy=False)
        if fits is not None:
            fits[key] = (self.B, self.dual)
            while sum(_fit_bytes(*fit) for fit in fits.values()) > EASE_CACHE_BYTES:
                fits.popitem(last=False)
        return self

    def score(self, X_users: sp.csr_matrix) -> np.ndarray:
        B = _fitted(self.B, self)
        X_users = sp.csr_matrix(X_users, dtype=np.float32)
        dual = self.dual
        if dual is None:
            return np.asarray(X_users @ B)
        # Stored numbers each form reads: B's rows of the known items, or (about) the fit
        # matrix twice and the users × users inverse once.
        long = np.diff(X_users.indptr) * B.shape[1] > dual.cost
        return _score_by_path(X_users, long, dual.score, lambda part: np.asarray(part @ B))


@dataclass
class EASEDual:
    """EASE scores through the users × users space (Woodbury), for populations smaller
    than the catalogue: with K = λI + XXᵀ, P = (XᵀX + λI)⁻¹ = (I − XᵀK⁻¹X)/λ, so
    x·B = x − (x·P)/diag(P) and x·P = (x − ((X·xᵀ)ᵀK⁻¹)·X)/λ. A user with 1,300 known
    items of ml-latest-small's 9,742 reads ~0.6 M stored numbers this way instead of
    12.7 M rows of B. Same scores as B up to rounding (float64 here)."""

    X: sp.csr_matrix  # the fit matrix, float64
    inverse: np.ndarray  # K⁻¹, users × users, float64
    diagonal: np.ndarray  # diag(P), per item
    lam: float

    @classmethod
    def fit(cls, X: sp.csr_matrix, lam: float) -> EASEDual:
        X = sp.csr_matrix(X, dtype=np.float64)
        K = (X @ X.T).toarray()
        K[np.diag_indices_from(K)] += lam
        inverse = _spd_inverse(K)
        # diag(XᵀK⁻¹X)_j = Σ_uv X_uj K⁻¹_uv X_vj, a block of items at a time (bounded memory)
        X_cols = sp.csc_matrix(X)
        quadratic = np.concatenate(
            [
                np.asarray(block.multiply(inverse @ block).sum(axis=0)).ravel()
                for block in (X_cols[:, j : j + 2048] for j in range(0, X.shape[1], 2048))
            ]
        )
        return cls(X, inverse, (1.0 - quadratic) / lam, float(lam))

    @property
    def cost(self) -> float:
        return 2.0 * self.X.nnz + float(self.inverse.size)

    def score(self, X_users: sp.csr_matrix) -> np.ndarray:
        dense = sp.csr_matrix(X_users, dtype=np.float64).toarray()  # scored users × items
        weights = self.inverse @ (self.X @ dense.T)  # fit users × scored users
        xP = (dense - np.asarray(self.X.T @ weights).T) / self.lam
        return (dense - xP / self.diagonal[None, :]).astype(np.float32)


def _score_by_path(
    X_users: sp.csr_matrix,
    through: np.ndarray,
    fast: Callable[[sp.csr_matrix], np.ndarray],
    plain: Callable[[sp.csr_matrix], np.ndarray],
) -> np.ndarray:
    """Float32 scores of every user: ``fast`` for the rows ``through`` marks, ``plain`` for
    the others (two forms of the same scores; see `ItemKNN` and `EASEDual`)."""
    if not through.any():
        return plain(X_users)
    if through.all():
        return fast(X_users)
    out = np.empty(X_users.shape, dtype=np.float32)
    rows, others = np.flatnonzero(through), np.flatnonzero(~through)
    out[rows] = fast(X_users[rows])
    out[others] = plain(X_users[others])
    return out


def reciprocal(values: np.ndarray) -> np.ndarray:
    """1 / values, and 0 where a value is 0 (an empty row or column weighs nothing)."""
    return np.divide(1.0, values, out=np.zeros_like(values), where=values > 0)


def recency_weights(times: sp.csr_matrix, last: int, decay: float) -> sp.csr_matrix:
    """Each user's ``last`` most recent items weighted ``decay``**k (k = 0: the latest).

    ``times`` holds when each (user, item) pair happened (see `segrec.evaluate.Split`);
    ties in time go to the higher column as the later one.
    """
    times = sp.csr_matrix(times)
    lengths = np.diff(times.indptr)
    rows = np.repeat(np.arange(times.shape[0]), lengths)
    order = np.lexsort((times.indices, times.data, rows))
    back = times.indptr[rows + 1] - 1 - np.arange(times.nnz)  # 0 for the latest of a row
    keep = back < last
    # Built from its CSR parts (each row keeps its last min(length, last) entries, in row
    # order), then columns sorted per row: the arrays the (row, column) form gave, without
    # its conversion (serving path).
    indptr = np.zeros(times.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.minimum(lengths, max(last, 0)), out=indptr[1:])
    weights = sp.csr_matrix(
        (decay ** back[keep].astype(np.float32), times.indices[order][keep], indptr),
        shape=times.shape,
        dtype=np.float32,
    )
    weights.sort_indices()
    return weights


class Transitions:
    """Sequence-aware baseline: which item comes next after the user's latest items.

    Fit counts, over every train history in time order, each pair (a, b) where b follows a
    within ``gap`` steps (weight 1/distance); a row-normalised count is P(next = b | a).
    A user's score is Σ decay**k · P(· | k-th latest item) over their ``last`` items, plus a
    popularity term a million times smaller that only breaks ties (a chain that never saw
    an item falls back to the most popular items rather than to column order).
    """

    name = "transition"

    def __init__(self, last: int = 3, decay: float = 0.5, gap: int = 2) -> None:
        if last < 1 or gap < 1 or not 0.0 < decay <= 1.0:
            raise ValueError("Transitions needs last >= 1, gap >= 1 and 0 < decay <= 1")
        self.last, self.decay, self.gap = last, decay, gap
        self.next: sp.csr_matrix | None = None
        self.popularity: np.ndarray | None = None

    def fit(self, times: sp.csr_matrix) -> Self:
        times = sp.csr_matrix(times)
        n_items = times.shape[1]
        rows = np.repeat(np.arange(times.shape[0]), np.diff(times.indptr))
        order = np.lexsort((times.indices, times.data, rows))
        rows, cols = rows[order], times.indices[order]
        sources, targets, weights = [], [], []
        for distance in range(1, self.gap + 1):
            same = rows[distance:] == rows[:-distance]
            sources.append(cols[:-distance][same])
            targets.append(cols[distance:][same])
            weights.append(np.full(int(same.sum()), 1.0 / distance, dtype=np.float32))
        counts = sp.csr_matrix(
            (np.concatenate(weights), (np.concatenate(sources), np.concatenate(targets))),
            shape=(n_items, n_items),
            dtype=np.float32,
        )
        counts.sum_duplicates()
        out = np.asarray(counts.sum(axis=1)).ravel()
        inverse = reciprocal(out)
        self.next = sp.csr_matrix(sp.diags(inverse.astype(np.float32)) @ counts)
        users = np.bincount(times.indices, minlength=n_items).astype(np.float32)
        self.popularity = users / max(float(users.max(initial=0.0)), 1.0)
        return self

    def score(self, times_users: sp.csr_matrix) -> np.ndarray:
        """Scores from the users' time matrix (a binary matrix weights every item alike)."""
        following = _fitted(self.next, self)
        recent = recency_weights(times_users, self.last, self.decay)
        scores = np.asarray((recent @ following).toarray(), dtype=np.float32)
        return scores + 1e-6 * _fitted(self.popularity, self)[None, :]


class RecentPopularity:
    """Popularity in a time window ending at the user's latest known event: what others
    took up around the time this user was last active.

    Fit events are cut into ``bins`` bins of equal event counts by time; a user is scored
    with the counts of the ``window`` last bins that end before their latest event (whole
    bins only, so nothing after that event is ever counted). A user with no known time
    (a new user in a chat) is scored with the last ``window`` bins of the data: now.
    """

    name = "recent_pop"

    def __init__(self, window: int = 8, bins: int = 256) -> None:
        if not 1 <= window <= bins:
            raise ValueError(f"window must be between 1 and bins ({bins}), got {window}")
        self.window, self.bins = window, bins
        self.edges: np.ndarray | None = None
        self.cumulative: np.ndarray | None = None

    def fit(self, times: sp.csr_matrix) -> Self:
        times = sp.csr_matrix(times)
        stamps = times.data.astype(np.float64)
        if stamps.size == 0:
            edges = np.zeros(2)
        else:
            edges = np.unique(np.quantile(stamps, np.linspace(0.0, 1.0, self.bins + 1)))
            edges[-1] = np.nextafter(edges[-1], np.inf)  # the last bin holds the latest event
        which = np.clip(np.searchsorted(edges, stamps, side="right") - 1, 0, len(edges) - 2)
        counts = np.zeros((len(edges) - 1, times.shape[1]), dtype=np.float32)
        np.add.at(counts, (which, times.indices), 1.0)
        self.edges = edges
        self.cumulative = np.vstack([np.zeros((1, times.shape[1]), np.float32), counts.cumsum(0)])
        return self

    def score(self, times_users: sp.csr_matrix | None, n_users: int) -> np.ndarray:
        """Window counts per user; ``times_users`` None (or an empty row): the latest window."""
        edges, cumulative = _fitted(self.edges, self), _fitted(self.cumulative, self)
        latest = np.full(n_users, np.inf)
        if times_users is not None:
            times_users = sp.csr_matrix(times_users)
            known = np.diff(times_users.indptr) > 0
            latest[known] = times_users.max(axis=1).toarray().ravel()[known]
        complete = np.searchsorted(edges[1:], latest, side="right")  # bins ending at or before
        start = np.maximum(complete - self.window, 0)
        return cumulative[complete] - cumulative[start]


class ALS:
    """Matrix factorisation for implicit feedback (Hu, Koren & Volinsky 2008), from the
    `implicit` package: the peer most users would try first.

    Confidence is ``alpha`` on an interaction and 1 elsewhere (implicit's convention).
    Users are scored from their history with the item factors held fixed (implicit's
    batched ``recalculate_user``), so a user the model never saw is scored the same way as
    one it did. One BLAS thread: `implicit`
    runs its own threads and warns (and slows down) when BLAS runs more.
    """

    name = "als"

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.1,
        alpha: float = 1.0,
        *,
        iterations: int = 15,
        seed: int = 0,
    ) -> None:
        self.factors, self.regularization, self.alpha = factors, regularization, alpha
        self.iterations, self.seed = iterations, seed
        self.model: object | None = None

    def fit(self, X: sp.csr_matrix) -> Self:
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, "blas"):
            model = AlternatingLeastSquares(
                factors=self.factors,
                regularization=self.regularization,
                alpha=self.alpha,
                iterations=self.iterations,
                random_state=self.seed,
            )
            model.fit(sp.csr_matrix(X, dtype=np.float32), show_progress=False)
        self.model = model
        return self

    def score(self, X_users: sp.csr_matrix) -> np.ndarray:
        from threadpoolctl import threadpool_limits

        model = _fitted(self.model, self)
        X_users = sp.csr_matrix(X_users, dtype=np.float32)
        with threadpool_limits(1, "blas"):
            users = model.recalculate_user(np.arange(X_users.shape[0]), X_users)  # type: ignore[attr-defined]
        return np.asarray(users @ model.item_factors.T, dtype=np.float32)  # type: ignore[attr-defined]


ALS_GRID = {"factors": (32, 64, 128), "regularization": (0.01, 0.1, 1.0), "alpha": (1.0, 10.0)}


def tune_als(validation: Split, *, seed: int = 0) -> tuple[dict[str, float], dict[str, float]]:
    """ALS settings with the best validation NDCG@10: factors × regularisation on the grid
    (alpha 1), then alpha at the best pair. Returns the settings and every tried one's
    NDCG@10 (keyed "factors/regularization/alpha")."""
    tried: dict[str, float] = {}

    def run(factors: int, reg: float, alpha: float) -> float:
        model = ALS(factors, reg, alpha, seed=seed).fit(validation.fit)
        value = evaluate_scores(model.score(validation.train), validation)["ndcg@10"]
        tried[f"{factors}/{reg:g}/{alpha:g}"] = round(value, 4)
        return value

    pairs = [(f, r) for f in ALS_GRID["factors"] for r in ALS_GRID["regularization"]]
    values = {(f, r, 1.0): run(f, r, 1.0) for f, r in pairs}
    factors, reg, _ = max(values, key=lambda key: values[key])
    for alpha in ALS_GRID["alpha"]:
        if (factors, reg, alpha) not in values:
            values[(factors, reg, alpha)] = run(factors, reg, alpha)
    factors, reg, alpha = max(values, key=lambda key: values[key])
    return {"factors": factors, "regularization": reg, "alpha": alpha}, tried


EASE_CACHE_BYTES = 2 * 1024**3
_EASE_FITS: ContextVar[
    OrderedDict[tuple[object, ...], tuple[np.ndarray, EASEDual | None]] | None
] = ContextVar("ease_fits", default=None)


def _fit_bytes(B: np.ndarray, dual: EASEDual | None) -> int:
    """What one cached EASE fit holds in memory."""
    if dual is None:
        return B.nbytes
    return B.nbytes + dual.inverse.nbytes + dual.X.data.nbytes + dual.X.indices.nbytes


@contextmanager
def reuse_ease_fits() -> Iterator[None]:
    """Within the block, an EASE fit on the same (λ, history matrix) as a recent one reuses
    its B and user-space form (the last few, up to `EASE_CACHE_BYTES`): `segrec eval` fits
    the same folds for its chat and cold tracks, and each fit of a 9k-item catalogue takes a
    minute on 2 cores. Off elsewhere, so a long-lived server never holds stale matrices."""
    token = _EASE_FITS.set(OrderedDict())
    try:
        yield
    finally:
        _EASE_FITS.reset(token)


def _matrix_key(X: sp.csr_matrix, lam: float) -> tuple[object, ...]:
    digest = hashlib.sha256(X.indptr.tobytes())
    digest.update(X.indices.tobytes())
    digest.update(X.data.tobytes())
    return (float(lam), X.shape, digest.hexdigest())


def tune_ease(
    split: Split, lams: Sequence[float] = EASE_LAMBDAS
) -> tuple[float, dict[float, float]]:
    """λ with the best NDCG@10 on the validation split cut from ``split``'s train part.

    Ties go to the earlier λ in ``lams``. Returns the λ and every λ's validation NDCG@10.
    """
    if not lams:
        raise ValueError("tune_ease needs at least one λ")
    validation = validation_split(split)
    results: dict[float, float] = {}
    for lam in lams:
        scores = EASE(lam).fit(validation.fit).score(validation.train)
        results[float(lam)] = evaluate_scores(scores, validation)["ndcg@10"]
    best = max(results, key=lambda lam: results[lam])
    return best, results


class SegmentPopularity:
    """Popularity within the user's segment: what people like this user interact with.

    Unlike a `Scorer` it needs segment labels, both to fit (one per row of X) and to score
    (one per scored user). Label -1 (or any label not seen in fit) falls back to global
    popularity.
    """

    name = "segment_pop"

    def __init__(self) -> None:
        self.counts: dict[int, np.ndarray] = {}
        self.global_counts: np.ndarray | None = None

    def fit(self, X: sp.csr_matrix, labels: np.ndarray) -> Self:
        labels = _labels(labels, X.shape[0])
        X = sp.csr_matrix(X, dtype=np.float32)
        self.global_counts = np.asarray(X.sum(axis=0), dtype=np.float32).ravel()
        self.counts = {
            int(label): np.asarray(X[labels == label].sum(axis=0), dtype=np.float32).ravel()
            for label in np.unique(labels)
            if label >= 0
        }
        return self

    def score(self, X_users: sp.csr_matrix, labels: np.ndarray) -> np.ndarray:
        global_counts = _fitted(self.global_counts, self)
        labels = _labels(labels, X_users.shape[0])
        scores = np.empty((X_users.shape[0], global_counts.size), dtype=np.float32)
        for row, label in enumerate(labels):
            scores[row] = self.counts.get(int(label), global_counts)
        return scores


def cosine_scores(
    user_vectors: np.ndarray, item_vectors: np.ndarray, *, normalise_items: bool = True
) -> np.ndarray:
    """Cosine similarity of every user vector with every item vector, (n_users, n_items).

    User vectors are L2-normalised here (zero vectors score 0), so callers may pass raw means
    of item embeddings. Pass ``normalise_items=False`` when the item vectors are already unit
    length (the encoder's output is) to skip a pass over the catalogue on the serving path.
    """
    users = _l2_normalise(np.asarray(user_vectors, dtype=np.float32))
    items = np.asarray(item_vectors, dtype=np.float32)
    items = _l2_normalise(items) if normalise_items else items
    if items.ndim != 2 or users.shape[1] != items.shape[1]:
        raise ValueError(f"user vectors are {users.shape[1]}-d, item vectors {items.shape}")
    return users @ items.T


@dataclass
class Blend:
    """Weighted sum of per-user standardised signals.

    Each signal is z-scored over the items of each user's row, so weights are comparable
    across signals whose scales differ by orders of magnitude (counts, cosines, EASE
    scores). z-scoring is an increasing affine map per user, and it is done in float64, so a
    blend whose only non-zero weight is one signal ranks exactly like that signal.
    """

    weights: dict[str, float] = field(default_factory=dict)

    def combine(self, signals: Mapping[str, np.ndarray]) -> np.ndarray:
        """The blended score matrix (float64); signals with weight 0 are not needed."""
        active = {name: w for name, w in self.weights.items() if w != 0.0}
        if not active:
            raise ConfigError("blend: every weight is 0; give at least one signal a weight")
        missing = [name for name in active if name not in signals]
        if missing:
            raise ConfigError(
                f"blend: weight for {missing[0]!r} but no such signal "
                f"(available: {', '.join(sorted(signals)) or 'none'}); remove the weight"
            )
        return _weighted_sum({name: standardise(signals[name]) for name in active}, active)


def standardise(scores: np.ndarray) -> np.ndarray:
    """Per-row z-score in float64; a constant row becomes all zeros."""
    scores = np.asarray(scores, dtype=np.float64)
    centred = scores - scores.mean(axis=1, keepdims=True)
    spread = centred.std(axis=1, keepdims=True)
    return np.divide(centred, spread, out=np.zeros_like(centred), where=spread > 0)


def tune_blend(
    signals_val: Mapping[str, np.ndarray],
    split_val: Split,
    *,
    grid: Sequence[float] = BLEND_GRID,
    rounds: int = 3,
    candidates: int | None = TUNE_CANDIDATES,
) -> tuple[Blend, list[dict[str, object]]]:
    """Blend weights by coordinate ascent on validation NDCG@10.

    Starts from the best single signal (weight 1), then, signal by signal, tries every grid
    weight for the others and keeps a change only if it strictly improves; repeats until a
    round changes nothing. Since every single signal is a candidate, the result is never
    worse on validation than the best of them (e.g. EASE alone). Returns the blend and the
    trace: one entry per evaluated weight vector.

    Each weight vector is scored on each user's ``candidates`` best unseen items of every
    signal only (z-scored over the whole catalogue first, as the blend does): hundreds of
    evaluations then cost what a handful over the catalogue would. A single signal's top 20
    is always among them (at least 20 are kept, ties go to the lower column as in `top_k`),
    so its figure is exact; a blend's could only differ if an item
    outside every signal's top ``candidates`` reached its top 20. ``None`` ranks the whole
    catalogue.
    """
    names = sorted(signals_val)
    if not names:
        raise ValueError("tune_blend needs at least one signal")
    standardised, columns, padding = _candidate_view(signals_val, split_val, candidates)
    n_items = len(split_val.items)
    trace: list[dict[str, object]] = []
    cache: dict[tuple[float, ...], float] = {}

    def evaluate(weights: dict[str, float]) -> float:
        key = tuple(weights[n] for n in names)
        if key not in cache:
            total = _weighted_sum(standardised, weights)
            total[padding] = -np.inf
            best = top_k(total, 20)
            ranked = np.where(best >= 0, np.take_along_axis(columns, np.maximum(best, 0), 1), -1)
            per_user = ranking_metrics(ranked, split_val.test, n_items)
            metrics = {m: float(v.mean()) if v.size else 0.0 for m, v in per_user.items()}
            cache[key] = metrics["ndcg@10"]
            trace.append({"weights": dict(weights), **metrics, "users": float(len(ranked))})
        return cache[key]

    singles = [{n: float(n == anchor) for n in names} for anchor in names]
    best = max(singles, key=evaluate)
    best_value = evaluate(best)
    anchor = next(n for n in names if best[n] == 1.0)
    for _ in range(rounds):
        improved = False
        for name, weight in itertools.product([n for n in names if n != anchor], grid):
            candidate = {**best, name: float(weight)}
            value = evaluate(candidate)
            if value > best_value:
                best, best_value, improved = candidate, value, True
        if not improved:
            break
    return Blend({n: w for n, w in best.items() if w != 0.0}), trace


def _candidate_view(
    signals: Mapping[str, np.ndarray], split: Split, candidates: int | None
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Per-user z-scored signals restricted to each signal's best unseen items.

    Returns the standardised signals at those columns (users × width), the column indices
    (sorted per row, so ties still go to the lower column) and a mask of padding cells. A
    per-row z-score is increasing, so each signal's best items are picked on its raw
    scores, and only the picked cells are standardised (with their whole row's mean and
    spread, as `standardise` would).
    """
    names = sorted(signals)
    n_users, n_items = np.shape(signals[names[0]])
    seen = sp.csr_matrix(split.train)
    seen_rows = np.repeat(np.arange(n_users), np.diff(seen.indptr))
    if candidates is None or n_items <= 4 * max(candidates, 20):
        keep = np.ones((n_users, n_items), dtype=bool)
    else:
        keep = np.zeros((n_users, n_items), dtype=bool)
        for name in names:
            top = top_k(signals[name], max(candidates, 20), seen)
            keep[np.arange(n_users)[:, None], np.maximum(top, 0)] |= top >= 0
    keep[seen_rows, seen.indices] = False
    width = max(int(keep.sum(axis=1).max(initial=0)), 1)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :width]
    padding = ~np.take_along_axis(keep, order, axis=1)
    out = {}
    for name in names:
        raw = np.asarray(signals[name])
        mean = raw.mean(axis=1, keepdims=True, dtype=np.float64)
        spread = raw.std(axis=1, keepdims=True, dtype=np.float64)
        picked = np.take_along_axis(raw, order, axis=1).astype(np.float64) - mean
        out[name] = np.divide(picked, spread, out=np.zeros_like(picked), where=spread > 0)
    return out, order, padding


def recommend_top_n(
    scores: np.ndarray,
    seen: sp.csr_matrix | None,
    n: int,
    *,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The n best items per user and their scores, best first.

    Seen items are never returned; ``allowed`` is a boolean mask over items (one row for
    everyone, or one row per user) for category filters and exclude lists. Rows with fewer
    than n eligible items are padded with index -1 and score -inf. Ties go to the lower index.
    """
    indices = top_k(scores, n, seen, allowed=allowed)
    picked = np.take_along_axis(np.asarray(scores), np.maximum(indices, 0), axis=1)
    picked = np.where(indices >= 0, picked, -np.inf)
    return indices, picked


def _weighted_sum(
    standardised: Mapping[str, np.ndarray], weights: Mapping[str, float]
) -> np.ndarray:
    """Σ weight · signal over the non-zero weights (signals already standardised)."""
    active = [(name, w) for name, w in weights.items() if w != 0.0]
    first_name, first_weight = active[0]
    total = first_weight * standardised[first_name]
    for name, weight in active[1:]:
        total += weight * standardised[name]
    return total


def _spd_inverse(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix via Cholesky (half the flops of LU)."""
    import scipy.linalg  # only fitting needs it: loading a saved EASE does not pay the import

    potrf, potri = scipy.linalg.lapack.get_lapack_funcs(("potrf", "potri"), (matrix,))
    factor, info = potrf(matrix, lower=False, overwrite_a=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"Cholesky failed (info={info}); is λ > 0?")
    inverse, info = potri(factor, lower=False, overwrite_c=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"inverse from Cholesky failed (info={info})")
    upper = np.triu(inverse)
    return upper + np.triu(inverse, 1).T


def _keep_top_per_column(S: sp.csc_matrix, k: int) -> sp.csc_matrix:
    """Keep the k largest entries of each column (ties by lower row index)."""
    S = sp.csc_matrix(S)
    keep = np.zeros(S.nnz, dtype=bool)
    for col in range(S.shape[1]):
        start, end = S.indptr[col], S.indptr[col + 1]
        if end - start <= k:
            keep[start:end] = True
            continue
        values = S.data[start:end]
        rows = S.indices[start:end]
        order = np.lexsort((rows, -values))[:k]
        keep[start + order] = True
    S.data[~keep] = 0.0
    S.eliminate_zeros()
    return S


def _l2_normalise(vectors: np.ndarray) -> np.ndarray:
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be 2-d, got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def _labels(labels: np.ndarray | Sequence[int | None], n: int) -> np.ndarray:
    """Segment labels as int64 with None/NaN → -1, checked against the number of rows."""
    values = np.array([-1 if v is None or v != v else int(v) for v in labels], dtype=np.int64)
    if values.size != n:
        raise ValueError(f"{values.size} segment labels for {n} rows")
    return values


def _fitted(value: T | None, scorer: object) -> T:
    if value is None:
        raise RuntimeError(f"{type(scorer).__name__} is not fitted; call fit() first")
    return value
