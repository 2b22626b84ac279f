"""The default ranker: five signals, blended with weights tuned on a validation split.

Signals (each a users × items score matrix; see `segrec.recommend` for the models):

* ``ease`` — EASE on the binary history matrix (λ tuned on validation). Left out above
  `EASE_MAX_ITEMS` items, where its dense item × item matrix would not fit in memory.
* ``itemknn`` — item–item cosine; on catalogues above `EASE_MAX_ITEMS` it keeps each item's
  `LARGE_NEIGHBOURS` nearest items only.
* ``cosine`` — content: the user's vector (by default the mean embedding of the items they
  interacted with; a profile embedding when given) against every item's embedding.
* ``segment_pop`` — popularity among the members of the user's segment.
* ``pop`` — global popularity, log-scaled (log1p of the counts: after the per-user z-score
  a few blockbusters would otherwise flatten every other item to the same score).
* ``transition`` — what comes next after the user's latest items (`segrec.recommend.
  Transitions`, fit on every train history in time order). Scoring reads the users' event
  times when given; without them (a caller that keeps no order) every known item counts
  as if it were the latest.
* ``recent_pop`` — popularity in a window of time ending at the user's latest known event
  (`segrec.recommend.RecentPopularity`; log-scaled like ``pop``). Without times: the
  latest window of the data.
* ``category_pop`` — popularity within the categories the user likes
  (`category_popularity`): log1p(count) of an item times how much of the user's taste its
  categories cover, negative for an item in a category the user said they dislike. The
  categories are what a chat user named (``user_categories``), else the categories of
  their known items. A catalogue without categories makes it a constant row: it then
  adds nothing to the blend.
* ``rp3`` — a two-step random walk item → user → item (`segrec.recommend.RandomWalk`,
  RP3beta with β = 0): like ``itemknn`` but each co-occurrence weighs 1 / the length of the
  history it comes from; on catalogues above `EASE_MAX_ITEMS` items it keeps
  `LARGE_NEIGHBOURS` next items per item.

The blend z-scores each signal over each user's row and adds them with weights (see
`segrec.recommend.Blend`). Two weight sets are tuned: ``long`` for users with more than
``short_history`` known items and ``short`` for newcomers, because what works differs:
collaborative models dominate once a history exists, popularity and content carry a user
with three items. ``long`` is tuned on the PROTOCOL's validation split cut from the train
data (the last 20% of each user's train), ``short`` on the same validation users cut to
their first 2, 3 and 4 items, stacked (PROTOCOL's cold track, models fit without the scored
users; one cut length alone gave weights that changed with every seed).
Tuning starts from the best single signal, so on validation a blend is never worse than
EASE alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Self

import numpy as np
import scipy.sparse as sp

from segrec.cluster import assign, cluster_vectors
from segrec.errors import ConfigError
from segrec.evaluate import (
    Split,
    evaluate_scores,
    fold_rows,
    stacked_cold_split,
    subsample,
    validation_split,
)
from segrec.recommend import (
    EASE,
    EASE_LAMBDAS,
    Blend,
    EASEDual,
    ItemKNN,
    RandomWalk,
    RecentPopularity,
    SegmentPopularity,
    Transitions,
    cosine_scores,
    reciprocal,
    recommend_top_n,
    standardise,
    tune_blend,
)

SIGNALS: tuple[str, ...] = (
    "ease",
    "itemknn",
    "cosine",
    "segment_pop",
    "pop",
    "transition",
    "recent_pop",
    "category_pop",
    "rp3",
)
EASE_MAX_ITEMS = 20_000
LARGE_NEIGHBOURS = 200
SHORT_HISTORY = 5
SHORT_CUTS = (2, 3, 4)  # the short-history weights are tuned on these history lengths
SHORT_FOLDS = 2  # tuning's cold cuts: each fit leaves out half the tuning sample, not a fifth
MIN_TUNING_USERS = 20
# Weights are tuned on a seeded sample of at most this many validation users: thousands
# already pin the weights down, and tuning time and memory grow with users × catalogue.
TUNE_USERS = 2_000
SEGMENT_MIN_USERS = 30  # a segment with fewer validation users keeps the global weights
SEGMENT_SHRINK = 100  # pseudo-users of global weight mixed into a segment's own weights
# Used when there are too few users to tune on (fewer than MIN_TUNING_USERS). They are the
# weights tuned on ml-latest-small's validation split (benchmarks/quality.md).
DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    "long": {"ease": 1.0, "itemknn": 0.2, "pop": 0.05, "cosine": 0.05},
    "short": {"pop": 1.0, "itemknn": 0.35},
    # A new user of `segrec chat` who named or picked at least `CHAT_ITEMS` items (plus liked
    # categories and a segment): tuned by `segrec eval --tracks chat` on simulated
    # validation chats.
    "chat": {"ease": 1.0, "cosine": 0.75},
    # One who told less (a category, one item): tuned the same way on those chats.
    "chat_start": {"pop": 1.0, "itemknn": 0.35},
}
GROUPS = ("long", "short", "chat", "chat_start")
# A chat user with fewer liked items than this is ranked with the "chat_start" weights: on
# ml-latest-small's validation chats, one item moves the collaborative signals too little
# to weight them as after the favourites question (benchmarks/results/newcomers.md).
CHAT_ITEMS = 2


@dataclass
class RankerSpec:
    """What is stored with a run: weights per history group, model settings, how tuned."""

    weights: dict[str, dict[str, float]]
    ease_lambda: float | None = 200.0
    neighbours: int | None = None
    short_history: int = SHORT_HISTORY
    tuned: bool = False
    validation: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    segment_weights: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """Per history group, per segment label (as text): that segment's own weights, kept
    only where they beat the group's global weights on the segment's validation users."""

    @property
    def signals(self) -> list[str]:
        """Every signal some group gives a non-zero weight, in `SIGNALS` order."""
        sets = [*self.weights.values()]
        sets += [w for group in self.segment_weights.values() for w in group.values()]
        used = {name for weights in sets for name, w in weights.items() if w}
        return [name for name in SIGNALS if name in used]

    def as_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "ease_lambda": self.ease_lambda,
            "neighbours": self.neighbours,
            "short_history": self.short_history,
            "tuned": self.tuned,
            "validation": self.validation,
            "notes": self.notes,
            "segment_weights": self.segment_weights,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RankerSpec:
        return cls(
            weights={g: dict(w) for g, w in data["weights"].items()},
            ease_lambda=data.get("ease_lambda"),
            neighbours=data.get("neighbours"),
            short_history=int(data.get("short_history", SHORT_HISTORY)),
            tuned=bool(data.get("tuned", False)),
            validation=dict(data.get("validation", {})),
            notes=list(data.get("notes", [])),
            segment_weights={
                group: {label: dict(w) for label, w in by_label.items()}
                for group, by_label in data.get("segment_weights", {}).items()
            },
        )


def default_spec(n_items: int, *, available: Sequence[str] = SIGNALS) -> RankerSpec:
    """The untuned spec: `DEFAULT_WEIGHTS` restricted to what is available."""
    use_ease = n_items <= EASE_MAX_ITEMS and "ease" in available
    weights = {
        group: {
            name: w
            for name, w in DEFAULT_WEIGHTS[group].items()
            if name in available and (name != "ease" or use_ease)
        }
        for group in GROUPS
    }
    if not use_ease and "itemknn" in available:
        weights["long"].setdefault("itemknn", 1.0)
    for group in GROUPS:
        if not weights[group]:
            weights[group] = dict(weights["short"]) or {available[0]: 1.0}
    return RankerSpec(
        weights=weights,
        ease_lambda=200.0 if use_ease else None,
        neighbours=None if n_items <= EASE_MAX_ITEMS else LARGE_NEIGHBOURS,
    )


@dataclass
class Recommendations:
    """Top-n per user: item column indices (-1 pads), blended scores, per-signal parts.

    ``contributions[name][u, r]`` is weight × z-score of that signal for the r-th item of
    user u; they add up to the score.
    """

    indices: np.ndarray
    scores: np.ndarray
    contributions: dict[str, np.ndarray]


class Ranker:
    """The fitted models behind the signals, over one catalogue (the columns of X)."""

    def __init__(
        self,
        spec: RankerSpec,
        item_vectors: np.ndarray | None = None,
        *,
        names: Sequence[str] | None = None,
        categories: Sequence[Sequence[str]] | None = None,
    ) -> None:
        """``categories``: each catalogue item's categories (column order), for
        ``category_pop``; None or empty lists leave that signal constant (it adds nothing)."""
        self.spec = spec
        self.names = list(names) if names is not None else spec.signals
        unknown = [n for n in self.names if n not in SIGNALS]
        if unknown:
            raise ConfigError(
                f"ranker: unknown signal {unknown[0]!r} — choose from {', '.join(SIGNALS)}"
            )
        if "cosine" in self.names and item_vectors is None:
            raise ConfigError("ranker: the cosine signal needs item embeddings")
        if "ease" in self.names and spec.ease_lambda is None:
            raise ConfigError("ranker: EASE is off for this catalogue (too many items)")
        self.item_vectors = (
            None if item_vectors is None else np.asarray(item_vectors, dtype=np.float32)
        )
        self.ease: EASE | None = None
        self.knn: ItemKNN | None = None
        self.walk: RandomWalk | None = None
        self.counts: np.ndarray | None = None
        self.segments: SegmentPopularity | None = None
        self.transitions: Transitions | None = None
        self.recent: RecentPopularity | None = None
        self.category_matrix, self.category_names = category_matrix(
            categories if categories is not None else []
        )

    def fit(
        self,
        X: sp.csr_matrix,
        labels: np.ndarray | None = None,
        *,
        times: sp.csr_matrix | None = None,
    ) -> Self:
        """Fit the models the signals need on the binary history matrix X (users × items);
        ``times`` (same sparsity: when each pair happened) orders histories for
        ``transition``."""
        X = sp.csr_matrix(X, dtype=np.float32)
        timed = [name for name in ("transition", "recent_pop") if name in self.names]
        if timed and times is None:
            raise ConfigError(f"ranker: the {timed[0]} signal needs the event times")
        if "transition" in self.names:
            self.transitions = Transitions().fit(times)
        if "recent_pop" in self.names:
            self.recent = RecentPopularity().fit(times)
        if self.item_vectors is not None and self.item_vectors.shape[0] != X.shape[1]:
            raise ValueError(
                f"{self.item_vectors.shape[0]} item vectors for {X.shape[1]} catalogue items"
            )
        if self.category_matrix.shape[0] != X.shape[1]:
            if self.category_names:
                raise ValueError(
                    f"categories for {self.category_matrix.shape[0]} items, "
                    f"{X.shape[1]} catalogue items"
                )
            self.category_matrix = sp.csr_matrix((X.shape[1], 0), dtype=np.float32)
        if "ease" in self.names:
            assert self.spec.ease_lambda is not None
            self.ease = EASE(self.spec.ease_lambda).fit(X)
        if "itemknn" in self.names:
            self.knn = ItemKNN(self.spec.neighbours).fit(X)
        if "rp3" in self.names:
            self.walk = RandomWalk(neighbours=self.spec.neighbours).fit(X)
        self.counts = np.asarray(X.sum(axis=0), dtype=np.float32).ravel()
        if "segment_pop" in self.names:
            self.segments = SegmentPopularity().fit(
                X, labels if labels is not None else np.full(X.shape[0], -1)
            )
        return self

    def arrays(self) -> dict[str, np.ndarray]:
        """The fitted state as plain arrays, so it can be saved and loaded without a refit."""
        if self.counts is None:
            raise RuntimeError("Ranker is not fitted; call fit() first")
        out: dict[str, np.ndarray] = {"counts": self.counts}
        if self.ease is not None and self.ease.B is not None:
            out["ease_B"] = self.ease.B
            if self.ease.dual is not None:
                dual = self.ease.dual
                out |= csr_parts("ease_dual_X", dual.X) | {
                    "ease_dual_inverse": dual.inverse,
                    "ease_dual_diagonal": dual.diagonal,
                }
        if self.knn is not None and self.knn.similarity is not None:
            S = self.knn.similarity
            out |= csr_parts("knn", S) | {"knn_shape": np.asarray(S.shape, dtype=np.int64)}
            if self.knn.normalised is not None and self.knn.self_similarity is not None:
                Xn = self.knn.normalised
                out |= csr_parts("knn_fit", Xn) | {
                    "knn_fit_shape": np.asarray(Xn.shape, dtype=np.int64),
                    "knn_self": self.knn.self_similarity,
                }
        if self.walk is not None and self.walk.walk is not None:
            out |= csr_parts("walk", self.walk.walk)
        if self.segments is not None and self.segments.global_counts is not None:
            labels = sorted(self.segments.counts)
            out["segment_labels"] = np.asarray(labels, dtype=np.int64)
            out["segment_counts"] = (
                np.stack([self.segments.counts[label] for label in labels])
                if labels
                else np.zeros((0, self.counts.size), dtype=np.float32)
            )
        if self.transitions is not None and self.transitions.next is not None:
            out |= csr_parts("next", self.transitions.next) | {
                "next_popularity": np.asarray(self.transitions.popularity),
            }
        if self.recent is not None and self.recent.edges is not None:
            out |= {
                "recent_edges": self.recent.edges,
                "recent_cumulative": np.asarray(self.recent.cumulative),
            }
        if self.category_names:
            out |= csr_parts("category", self.category_matrix) | {
                "category_names": np.asarray(self.category_names, dtype=str),
            }
        return out

    @classmethod
    def from_arrays(
        cls,
        spec: RankerSpec,
        item_vectors: np.ndarray | None,
        arrays: Mapping[str, np.ndarray],
    ) -> Ranker:
        """A fitted ranker from :meth:`arrays` (memory-mapped arrays are used as they are)."""
        ranker = cls(spec, item_vectors)
        ranker.counts = np.asarray(arrays["counts"])
        if "ease" in ranker.names:
            assert spec.ease_lambda is not None
            ranker.ease = EASE(spec.ease_lambda)
            ranker.ease.B = arrays["ease_B"]
            if "ease_dual_inverse" in arrays:
                inverse = np.asarray(arrays["ease_dual_inverse"])
                ranker.ease.dual = EASEDual(
                    csr_from(arrays, "ease_dual_X", (inverse.shape[0], ranker.counts.size)),
                    inverse,
                    np.asarray(arrays["ease_dual_diagonal"]),
                    spec.ease_lambda,
                )
        if "itemknn" in ranker.names:
            ranker.knn = ItemKNN(spec.neighbours)
            shape = tuple(int(v) for v in arrays["knn_shape"])
            ranker.knn.similarity = csr_from(arrays, "knn", shape)
            if "knn_fit_shape" in arrays:  # saved sets from before the factored path lack it
                fit_shape = tuple(int(v) for v in arrays["knn_fit_shape"])
                ranker.knn.normalised = csr_from(arrays, "knn_fit", fit_shape)
                ranker.knn.self_similarity = np.asarray(arrays["knn_self"])
        if "rp3" in ranker.names:
            n = ranker.counts.size
            ranker.walk = RandomWalk(neighbours=spec.neighbours)
            ranker.walk.walk = csr_from(arrays, "walk", (n, n))
        if "segment_pop" in ranker.names:
            ranker.segments = SegmentPopularity()
            ranker.segments.global_counts = ranker.counts
            ranker.segments.counts = {
                int(label): np.asarray(row)
                for label, row in zip(
                    arrays["segment_labels"], arrays["segment_counts"], strict=True
                )
            }
        if "transition" in ranker.names:
            n = ranker.counts.size
            ranker.transitions = Transitions()
            ranker.transitions.next = csr_from(arrays, "next", (n, n))
            ranker.transitions.popularity = np.asarray(arrays["next_popularity"])
        if "recent_pop" in ranker.names:
            ranker.recent = RecentPopularity()
            ranker.recent.edges = np.asarray(arrays["recent_edges"])
            ranker.recent.cumulative = np.asarray(arrays["recent_cumulative"])
        if "category_names" in arrays:
            ranker.category_names = [str(c) for c in arrays["category_names"]]
            shape = (ranker.counts.size, len(ranker.category_names))
            ranker.category_matrix = csr_from(arrays, "category", shape)
        else:
            ranker.category_matrix = sp.csr_matrix((ranker.counts.size, 0), dtype=np.float32)
        return ranker

    def signals(
        self,
        X_users: sp.csr_matrix,
        *,
        labels: np.ndarray | None = None,
        user_vectors: np.ndarray | None = None,
        names: Sequence[str] | None = None,
        times: sp.csr_matrix | None = None,
        user_categories: sp.csr_matrix | None = None,
    ) -> dict[str, np.ndarray]:
        """Raw score matrices of the wanted signals for the given users' histories
        (``times``: when each known item happened, for ``transition``; ``user_categories``:
        users × `category_names`, +1 a category the user said they like, -1 one they
        dislike, for ``category_pop`` — None: the categories of the known items)."""
        if self.counts is None:
            raise RuntimeError("Ranker is not fitted; call fit() first")
        X_users = sp.csr_matrix(X_users, dtype=np.float32)
        out: dict[str, np.ndarray] = {}
        for name in names if names is not None else self.names:
            if name == "ease":
                assert self.ease is not None
                out[name] = self.ease.score(X_users)
            elif name == "itemknn":
                assert self.knn is not None
                out[name] = self.knn.score(X_users)
            elif name == "rp3":
                assert self.walk is not None
                out[name] = self.walk.score(X_users)
            elif name == "pop":
                out[name] = np.broadcast_to(np.log1p(self.counts), X_users.shape)
            elif name == "segment_pop":
                assert self.segments is not None
                rows = labels if labels is not None else np.full(X_users.shape[0], -1)
                out[name] = np.log1p(self.segments.score(X_users, rows))
            elif name == "cosine":
                assert self.item_vectors is not None
                vectors = (
                    user_vectors
                    if user_vectors is not None
                    else history_vectors(X_users, self.item_vectors)
                )
                out[name] = cosine_scores(vectors, self.item_vectors, normalise_items=False)
            elif name == "transition":
                assert self.transitions is not None
                out[name] = self.transitions.score(X_users if times is None else times)
            elif name == "recent_pop":
                assert self.recent is not None
                out[name] = np.log1p(self.recent.score(times, X_users.shape[0]))
            elif name == "category_pop":
                out[name] = category_popularity(
                    self.counts,
                    self.category_matrix,
                    user_categories
                    if user_categories is not None
                    else history_categories(X_users, self.category_matrix),
                )
        return out

    def category_row(self, liked: Sequence[str], disliked: Sequence[str] = ()) -> sp.csr_matrix:
        """One user's ``user_categories`` row: +1 per liked, -1 per disliked category
        (names not in this catalogue's categories are ignored)."""
        column = {c: j for j, c in enumerate(self.category_names)}
        row = np.zeros((1, len(self.category_names)), dtype=np.float32)
        for category in disliked:
            if category in column:
                row[0, column[category]] = -1.0
        for category in liked:
            if category in column:
                row[0, column[category]] = 1.0
        return sp.csr_matrix(row)

    def groups(self, X_users: sp.csr_matrix) -> np.ndarray:
        """Per user, "short" (at most ``short_history`` known items) or "long"."""
        known = np.diff(sp.csr_matrix(X_users).indptr)
        return np.where(known <= self.spec.short_history, "short", "long")

    def weights_for(self, group: str, label: int | None = None) -> dict[str, float]:
        """The weights a user of this history group (and segment) is ranked with: the
        segment's own where the tuner kept some, else the group's."""
        if label is not None:
            own = self.spec.segment_weights.get(group, {}).get(str(int(label)))
            if own is not None:
                return own
        return self.spec.weights.get(group, {})

    def weighted(self, groups: np.ndarray, labels: np.ndarray | None = None) -> list[str]:
        """The signals some of these users' weight sets use: the only ones worth scoring
        (a signal with weight 0 adds nothing to the blend and its part is 0). Every signal
        when no weight is set, so `blend` says so."""
        keys = set(zip(groups, labels if labels is not None else [None] * len(groups), strict=True))
        used = {name for key in keys for name, w in self.weights_for(*key).items() if w}
        return [name for name in self.names if name in used] or list(self.names)

    def blend(
        self,
        signals: Mapping[str, np.ndarray],
        groups: np.ndarray,
        labels: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Blended scores (float64) and each signal's weighted part, per the user's group
        (and, given ``labels``, segment: see `weights_for`)."""
        n_users = len(groups)
        z = {name: standardise(matrix) for name, matrix in signals.items()}
        n_items = next(iter(z.values())).shape[1]
        keys = list(zip(groups, labels if labels is not None else [None] * n_users, strict=True))
        sets = {key: self.weights_for(*key) for key in set(keys)}
        parts: dict[str, np.ndarray] = {}
        for name in z:
            weight = np.array([sets[key].get(name, 0.0) for key in keys], dtype=np.float64)
            if np.any(weight):
                parts[name] = z[name] * weight[:, None]
        if not parts:
            raise ConfigError("ranker: every weight is 0; give at least one signal a weight")
        total = np.zeros((n_users, n_items), dtype=np.float64)
        for part in parts.values():
            total += part
        return total, parts

    def recommend(
        self,
        X_users: sp.csr_matrix,
        n: int,
        *,
        labels: np.ndarray | None = None,
        user_vectors: np.ndarray | None = None,
        allowed: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        times: sp.csr_matrix | None = None,
        user_categories: sp.csr_matrix | None = None,
        batch: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ) -> Recommendations:
        """The top n unseen items per user, in batches of users (bounded memory).

        ``groups`` names each user's weight set (default: "short"/"long" by history length;
        `segrec chat` passes "chat")."""
        X_users = sp.csr_matrix(X_users, dtype=np.float32)
        n_users = X_users.shape[0]
        indices = np.full((n_users, n), -1, dtype=np.int64)
        scores = np.full((n_users, n), -np.inf)
        contributions = {name: np.zeros((n_users, n)) for name in self.names}
        for start in range(0, n_users, batch):
            rows = slice(start, min(start + batch, n_users))
            Xb = X_users[rows]
            batch_groups = self.groups(Xb) if groups is None else np.asarray(groups)[rows]
            batch_labels = None if labels is None else labels[rows]
            signals = self.signals(
                Xb,
                labels=batch_labels,
                user_vectors=None if user_vectors is None else user_vectors[rows],
                names=self.weighted(batch_groups, batch_labels),
                times=None if times is None else sp.csr_matrix(times)[rows],
                user_categories=None
                if user_categories is None
                else sp.csr_matrix(user_categories)[rows],
            )
            total, parts = self.blend(signals, batch_groups, batch_labels)
            mask = allowed
            if allowed is not None and np.ndim(allowed) == 2:
                mask = allowed[rows]
            top, top_scores = recommend_top_n(total, Xb, n, allowed=mask)
            indices[rows], scores[rows] = top, top_scores
            safe = np.maximum(top, 0)
            for name, part in parts.items():
                picked = np.take_along_axis(part, safe, axis=1)
                contributions[name][rows] = np.where(top >= 0, picked, 0.0)
            if on_batch is not None:
                on_batch(Xb.shape[0])
        return Recommendations(indices, scores, contributions)


def csr_parts(prefix: str, matrix: sp.csr_matrix) -> dict[str, np.ndarray]:
    """A CSR matrix as the three arrays :meth:`Ranker.arrays` saves, named by ``prefix``."""
    return {
        f"{prefix}_data": matrix.data,
        f"{prefix}_indices": matrix.indices,
        f"{prefix}_indptr": matrix.indptr,
    }


def csr_from(
    arrays: Mapping[str, np.ndarray], prefix: str, shape: tuple[int, ...]
) -> sp.csr_matrix:
    """The CSR matrix :func:`csr_parts` saved (memory-mapped arrays used as they are)."""
    parts = (arrays[f"{prefix}_data"], arrays[f"{prefix}_indices"], arrays[f"{prefix}_indptr"])
    return sp.csr_matrix(parts, shape=shape)


def chat_group(liked_items: int, told: bool, weights: Mapping[str, Any], short_history: int) -> str:
    """The weight set of a chat user who liked ``liked_items`` items and told anything
    (``told``: an item or a category, liked or not): "chat" from `CHAT_ITEMS` items,
    "chat_start" below that, the history groups before anything was told (or for a spec
    tuned before these groups existed)."""
    if told and "chat" in weights and (liked_items >= CHAT_ITEMS or "chat_start" not in weights):
        return "chat"
    if told and "chat_start" in weights:
        return "chat_start"
    return "short" if liked_items <= short_history else "long"


def category_matrix(
    categories: Sequence[Sequence[str]],
) -> tuple[sp.csr_matrix, list[str]]:
    """Items × categories (binary, float32) from each item's category list, and the
    category of each column (sorted)."""
    names = sorted({str(c) for cats in categories for c in cats})
    column = {c: j for j, c in enumerate(names)}
    rows = [i for i, cats in enumerate(categories) for _ in dict.fromkeys(map(str, cats))]
    cols = [column[c] for cats in categories for c in dict.fromkeys(map(str, cats))]
    matrix = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(categories), len(names))
    )
    return matrix, names


def history_categories(X_users: sp.csr_matrix, item_categories: sp.csr_matrix) -> sp.csr_matrix:
    """Each user's taste over categories from their known items: the share of the known
    items in each category (users × categories; an empty history gives an empty row)."""
    X = sp.csr_matrix(X_users, dtype=np.float32)
    X.data[:] = 1.0
    known = np.asarray(X.sum(axis=1)).ravel()
    inverse = reciprocal(known)
    return sp.csr_matrix(sp.diags(inverse.astype(np.float32)) @ (X @ item_categories))


def category_popularity(
    counts: np.ndarray, item_categories: sp.csr_matrix, user_categories: sp.csr_matrix
) -> np.ndarray:
    """``category_pop``: log1p(count) × (the liked weight of the item's categories, summed)
    for items in a liked category; -log1p(count) for an item in a disliked one (a user
    who said no to Horror should see popular Horror last, not merely unboosted).

    ``user_categories`` is users × categories: positive entries are how much the user likes
    a category (1 for a named one, the share of the known items for a history), negative
    ones mark dislikes. Users × items, dense; a user without categories gets a zero row.
    """
    U = sp.csr_matrix(user_categories, dtype=np.float32)
    n_users, n_items = U.shape[0], item_categories.shape[0]
    if U.shape[1] == 0 or U.nnz == 0:
        return np.zeros((n_users, n_items), dtype=np.float32)
    liked = U.maximum(0)
    disliked = (-U).maximum(0)
    disliked.data[:] = 1.0
    C_T = sp.csr_matrix(item_categories.T, dtype=np.float32)
    match = np.asarray((liked @ C_T).toarray())
    if disliked.nnz:
        match = np.where(np.asarray((disliked @ C_T).toarray()) > 0, -1.0, match)
    return (match * np.log1p(np.asarray(counts, dtype=np.float32))[None, :]).astype(np.float32)


def history_vectors(X_users: sp.csr_matrix, item_vectors: np.ndarray) -> np.ndarray:
    """Each user's mean item embedding (unit length; zero for an empty history)."""
    vectors = np.asarray(sp.csr_matrix(X_users, dtype=np.float32) @ item_vectors)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


# ------------------------------------------------------------------------------ tuning

LabelsFor = Callable[[Split], tuple[np.ndarray, np.ndarray]]
"""Segment labels for a split: (one per row of ``fit``, one per evaluated user)."""


def split_signals(
    split: Split,
    spec: RankerSpec,
    names: Sequence[str],
    *,
    item_vectors: np.ndarray | None,
    labels_for: LabelsFor | None = None,
    categories: Sequence[Sequence[str]] | None = None,
) -> dict[str, np.ndarray]:
    """Every named signal for the split's users, from models fit the way the track needs
    (once on the warm track, per fold on the cold one; see `segrec.evaluate.fold_scores`).

    ``item_vectors`` (and ``categories``, each item's category list) are aligned with
    ``split.items``.
    """
    fit_labels = user_labels = None
    if "segment_pop" in names:
        if labels_for is None:
            raise ConfigError("ranker: segment_pop needs segment labels")
        fit_labels, user_labels = labels_for(split)
    out: dict[str, np.ndarray] = {}
    for fit_rows, user_rows in fold_rows(split):
        ranker = Ranker(spec, item_vectors, names=names, categories=categories).fit(
            split.fit[fit_rows],
            None if fit_labels is None else fit_labels[fit_rows],
            times=None if split.fit_time is None else split.fit_time[fit_rows],
        )
        signals = ranker.signals(
            split.train[user_rows],
            labels=None if user_labels is None else user_labels[user_rows],
            times=None if split.train_time is None else split.train_time[user_rows],
        )
        for name, scores in signals.items():
            if name not in out:
                out[name] = np.empty((len(split.users), scores.shape[1]), dtype=np.float32)
            out[name][user_rows] = scores
    return out


def kmeans_labels(
    split: Split, item_vectors_for: Callable[[Split], np.ndarray], k: int, seed: int
) -> LabelsFor:
    """Segment labels from one k-means on the mean item embedding of every train history of
    ``split`` (the default ``--represent items`` clustering of `segrec cluster`).

    For any split cut from it (validation, cold cuts), fit rows keep their user's label and
    scored users get the centroid nearest their known history, so a label means the same
    segment on every split, as a workspace's run labels do. Used by `segrec eval`, where the
    population is not clustered yet; the clustering sees train histories only.
    """
    fit_vectors = history_vectors(split.fit, item_vectors_for(split))
    clustering = cluster_vectors(fit_vectors, k=min(k, fit_vectors.shape[0]), seed=seed)
    label_of = dict(zip(split.fit_users, clustering.labels.astype(np.int64), strict=True))

    def labels_for(part: Split) -> tuple[np.ndarray, np.ndarray]:
        fit = np.array([label_of.get(u, -1) for u in part.fit_users], dtype=np.int64)
        known = history_vectors(part.train, item_vectors_for(part))
        scored, _ = assign(known, clustering.centroids)
        return fit, np.asarray(scored, dtype=np.int64)

    return labels_for


def tune_ranker(
    split: Split,
    *,
    item_vectors_for: Callable[[Split], np.ndarray] | None,
    labels_for: LabelsFor | None = None,
    categories_for: Callable[[Split], Sequence[Sequence[str]]] | None = None,
    lambdas: Sequence[float] = EASE_LAMBDAS,
    seed: int = 0,
    on_stage: Callable[[str], None] | None = None,
) -> RankerSpec:
    """Tune EASE's λ and both weight sets on validation splits cut from ``split``'s train.

    ``item_vectors_for(split)`` gives item embeddings aligned with ``split.items`` (None: no
    content signal); ``labels_for`` segment labels (None: no segment signal);
    ``categories_for(split)`` each item's categories (None: no ``category_pop``). Too few users
    to tune on gives `default_spec`, marked untuned with the reason.
    """
    stage = on_stage or (lambda _: None)
    available = [
        name
        for name in SIGNALS
        if (name != "cosine" or item_vectors_for is not None)
        and (name != "segment_pop" or labels_for is not None)
        and (name != "category_pop" or categories_for is not None)
    ]
    spec = default_spec(len(split.items), available=available)
    if len(split.users) < MIN_TUNING_USERS:
        spec.notes.append(
            f"only {len(split.users)} users with a held-out item (< {MIN_TUNING_USERS}): "
            "default weights, not tuned"
        )
        return spec
    if spec.ease_lambda is None:
        available = [n for n in available if n != "ease"]
        spec.notes.append(
            f"{len(split.items)} items > {EASE_MAX_ITEMS}: EASE left out, ItemKNN keeps "
            f"{LARGE_NEIGHBOURS} neighbours per item"
        )
    validation = validation_split(split)
    sampled = len(validation.users) > TUNE_USERS
    validation = subsample(validation, TUNE_USERS, seed=seed)
    vectors = item_vectors_for(validation) if item_vectors_for is not None else None
    categories = categories_for(validation) if categories_for is not None else None
    if categories is not None and not any(categories):  # no item has a category
        available = [n for n in available if n != "category_pop"]
        categories = None

    results: dict[str, Any] = {}
    others = [n for n in available if n != "ease"]
    signals = split_signals(
        validation,
        spec,
        others,
        item_vectors=vectors,
        labels_for=labels_for,
        categories=categories,
    )
    if spec.ease_lambda is not None:
        stage("tuning EASE λ")
        by_lambda: dict[float, float] = {}
        best_scores: np.ndarray | None = None
        for lam in lambdas:
            scores = EASE(lam).fit(validation.fit).score(validation.train)
            by_lambda[float(lam)] = evaluate_scores(scores, validation)["ndcg@10"]
            if max(by_lambda.values()) == by_lambda[float(lam)]:
                best_scores, spec.ease_lambda = scores, float(lam)
        assert best_scores is not None
        signals["ease"] = best_scores
        results["ease_lambda"] = {str(k): round(v, 4) for k, v in by_lambda.items()}

    stage("tuning weights (long histories)")
    blend, trace = tune_blend(signals, validation)
    weights = {"long": blend.weights}
    results["long"] = _tuning_summary(trace, signals, len(validation.users))
    segment_weights: dict[str, dict[str, dict[str, float]]] = {}
    if labels_for is not None:
        stage("tuning weights per segment (long histories)")
        segment_weights["long"], results["segments_long"] = tune_segment_weights(
            signals, validation, labels_for(validation)[1], blend.weights
        )
    del signals

    stage("tuning weights (short histories)")
    cold = stacked_cold_split(validation, SHORT_CUTS, folds=SHORT_FOLDS, seed=seed)
    cold_signals = split_signals(
        cold,
        spec,
        available,
        item_vectors=vectors,
        labels_for=labels_for,
        categories=categories,
    )
    blend, trace = tune_blend(cold_signals, cold)
    weights["short"] = blend.weights
    results["short"] = _tuning_summary(trace, cold_signals, len(cold.users))
    if labels_for is not None:
        stage("tuning weights per segment (short histories)")
        segment_weights["short"], results["segments_short"] = tune_segment_weights(
            cold_signals, cold, labels_for(cold)[1], blend.weights
        )
    spec.segment_weights = {group: kept for group, kept in segment_weights.items() if kept}
    for group in ("chat", "chat_start"):  # need simulated chats: `segrec eval` tunes them
        weights[group] = spec.weights[group]
    spec.weights = weights
    spec.tuned = True
    spec.validation = results
    spec.notes.append(
        f"weights tuned on a validation split of {len(validation.users)} users"
        + (" (a seeded sample)" if sampled else "")
        + " (last 20% of "
        "train); short histories on the same users cut to their first "
        f"{', '.join(map(str, SHORT_CUTS))} items"
    )
    return spec


def tune_segment_weights(
    signals: Mapping[str, np.ndarray],
    split: Split,
    labels: np.ndarray,
    global_weights: Mapping[str, float],
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Any]]]:
    """Per segment: weights tuned on that segment's validation users alone, shrunk towards
    the global weights (a segment with n users keeps n / (n + `SEGMENT_SHRINK`) of its own),
    and kept only where they beat the global weights on those users.

    Returns the kept weights by label (as text) and, for every segment, its strategy:
    users, NDCG@10 with the global and its own weights, the gain, and whether it was kept.
    """
    kept: dict[str, dict[str, float]] = {}
    report: dict[str, dict[str, Any]] = {}
    for label in np.unique(labels[labels >= 0]):
        rows = np.flatnonzero(labels == label)
        entry: dict[str, Any] = {"users": int(rows.size)}
        report[str(int(label))] = entry
        if rows.size < SEGMENT_MIN_USERS:
            entry["strategy"] = f"global (fewer than {SEGMENT_MIN_USERS} validation users)"
            continue
        part = replace(
            split,
            users=[split.users[r] for r in rows],
            train=split.train[rows],
            test=[split.test[r] for r in rows],
        )
        own = {name: matrix[rows] for name, matrix in signals.items()}
        tuned, _ = tune_blend(own, part)
        share = rows.size / (rows.size + SEGMENT_SHRINK)
        mixed = {
            name: round(share * tuned.weights.get(name, 0.0) + (1 - share) * w_global, 4)
            for name in sorted(set(tuned.weights) | set(global_weights))
            for w_global in [global_weights.get(name, 0.0)]
        }
        mixed = {name: w for name, w in mixed.items() if w}
        before = evaluate_scores(Blend(dict(global_weights)).combine(own), part)["ndcg@10"]
        after = evaluate_scores(Blend(mixed).combine(own), part)["ndcg@10"]
        entry |= {
            "global_ndcg@10": round(before, 4),
            "segment_ndcg@10": round(after, 4),
            "gain": round(after - before, 4),
        }
        if after > before:
            kept[str(int(label))] = mixed
            entry |= {"strategy": "own weights", "weights": mixed}
        else:
            entry["strategy"] = "global (own weights did not beat them on validation)"
    return kept, report


def segment_strategy(spec: RankerSpec | None, segment_id: int) -> dict[str, Any]:
    """How the ranker treats one segment's members, per history group: its own weights or
    the global ones, and the validation figures behind the choice (`tune_segment_weights`)."""
    if spec is None or not spec.tuned:
        return {"tuned": False}
    out: dict[str, Any] = {"tuned": True}
    for group in ("long", "short"):
        entry = spec.validation.get(f"segments_{group}", {}).get(str(segment_id))
        own = spec.segment_weights.get(group, {}).get(str(segment_id))
        out[group] = {
            "strategy": entry["strategy"] if entry else "global (segment not in the tuning)",
            "weights": own if own is not None else spec.weights.get(group, {}),
            **{k: v for k, v in (entry or {}).items() if k not in ("strategy", "weights")},
        }
    return out


def _tuning_summary(
    trace: Sequence[Mapping[str, Any]], signals: Mapping[str, np.ndarray], users: int
) -> dict[str, Any]:
    """Validation NDCG@10 of the chosen blend and of every signal alone (from the trace)."""
    names = sorted(signals)
    singles = {
        name: round(float(t["ndcg@10"]), 4)
        for t in trace
        for name in names
        if t["weights"] == {n: float(n == name) for n in names}
    }
    return {
        "users": users,
        "ndcg@10": round(max(float(t["ndcg@10"]) for t in trace), 4),
        "single_signals": singles,
    }
