"""From profiles and histories to segments: the vectors that are clustered, the privacy
threshold, and the facts every segment carries (size, lift, nearest members, quality).

Pure functions over arrays and frames; the workspace is read and written by the pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import pandas as pd

from segrec.cluster import Clustering, assign, margin, sample_rows
from segrec.embed import Encoder, VectorCache, embed_texts, mix_vectors, sparse_mean_vectors
from segrec.errors import InputError

Representation = Literal["profile", "items", "mix", "collab"]
REPRESENTATIONS: tuple[str, ...] = ("profile", "items", "mix", "collab")
RECENT_ITEMS = 30  # the items vector is the mean of a user's 30 most recent items
MIX_WEIGHT = 0.5  # share of the profile vector in "mix"
COLLAB_DIM = 8
"""Components of the ``collab`` space (truncated SVD); benchmarks/results/segments-represent.md."""
COLLAB_FIT_USERS = 200_000
"""The ``collab`` SVD is fitted on a seeded sample of at most this many users; every user is
then projected (in batches) with the fitted item vectors."""
COLLAB_N_INIT = 10
"""k-means restarts on ``collab`` vectors (8 dimensions: restarts are cheap, seeds agree)."""
TINY_POPULATION = 200  # below this many users the privacy threshold is lowered (and said so)


def item_matrix(
    items: pd.DataFrame, encoder: Encoder, cache: VectorCache | None = None
) -> np.ndarray:
    """Embeddings of every item's text, in the order of ``items``."""
    return embed_texts(list(items["text"]), encoder, cache=cache)


@dataclass(frozen=True)
class Histories:
    """Who interacted with what, as sparse user × item matrices (rows follow ``user_ids``,
    columns ``item_ids``), so a million users cost a few int arrays, not a DataFrame.

    ``seen`` is 1 for every distinct (user, item) pair; ``recent`` keeps only each user's
    RECENT_ITEMS most recent distinct items (the ``items`` representation).
    """

    user_ids: list[str]
    item_ids: list[str]
    seen: Any
    recent: Any

    @classmethod
    def from_pairs(
        cls, user_ids: Sequence[str], item_ids: Sequence[str], rows: np.ndarray, cols: np.ndarray
    ) -> Histories:
        """From (user row, item column) events in time order within each user."""
        from scipy import sparse

        n_users, n_items = len(user_ids), len(item_ids)
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        order = np.argsort(rows, kind="stable")  # by user, time order kept within a user
        keys = rows[order] * n_items + cols[order]
        # The last occurrence of every pair, in (user, time of last occurrence) order.
        _, first_from_end = np.unique(keys[::-1], return_index=True)
        last = np.sort(len(keys) - 1 - first_from_end)
        pair_rows, pair_cols = rows[order][last], cols[order][last]
        counts = np.bincount(pair_rows, minlength=n_users)
        ends = np.cumsum(counts)
        from_end = ends[pair_rows] - 1 - np.arange(pair_rows.size)
        keep = from_end < RECENT_ITEMS
        shape = (n_users, n_items)
        ones = np.ones(pair_rows.size, dtype=np.float32)
        seen = sparse.csr_matrix((ones, (pair_rows, pair_cols)), shape=shape)
        recent = sparse.csr_matrix((ones[keep], (pair_rows[keep], pair_cols[keep])), shape=shape)
        return cls(list(user_ids), list(item_ids), seen, recent)

    @classmethod
    def from_frame(
        cls, interactions: pd.DataFrame, user_ids: Sequence[str], item_ids: Sequence[str]
    ) -> Histories:
        """From interactions (oldest first within each user, as the store returns them);
        rows of other users or items are left out."""
        rows = pd.Index(user_ids).get_indexer(interactions["user_id"])
        cols = pd.Index(item_ids).get_indexer(interactions["item_id"])
        known = (rows >= 0) & (cols >= 0)
        return cls.from_pairs(user_ids, item_ids, rows[known], cols[known])


@dataclass(frozen=True)
class CollabSpace:
    """The fitted part of ``--represent collab``: where users sit by what they did.

    Fitted on histories: the RECENT_ITEMS most recent distinct items of each user, weighted
    by TF-IDF (idf = log((users + 1) / (users with the item + 1)) + 1), rows scaled to unit
    length, reduced by a truncated randomized SVD (on a seeded sample of at most
    COLLAB_FIT_USERS users). ``vectors[i]`` is item i's idf times its right singular vector,
    so a user's vector is the unit-length sum of the vectors of their recent items: the
    fitted users' own SVD coordinates (up to scale), and the same rule for anyone placed
    later. ``counts`` (users per item at fit time) weight a category's items when a
    newcomer names only categories (:meth:`of_categories`).

    Stored with the run (``Store.save_run(space=...)``), so `assign`, serving and the chat
    place users with the parts the segments were built from, never a refit.
    """

    item_ids: list[str]
    vectors: np.ndarray
    counts: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @classmethod
    def fit(
        cls,
        histories: Histories,
        *,
        dim: int = COLLAB_DIM,
        seed: int = 0,
        max_users: int = COLLAB_FIT_USERS,
    ) -> CollabSpace:
        from scipy import sparse
        from sklearn.utils.extmath import randomized_svd

        recent = sparse.csr_matrix(histories.recent, dtype=np.float64)
        n_users = recent.shape[0]
        if recent.nnz == 0:
            raise InputError(
                "--represent collab: no user has an interaction to fit the space on — "
                "ingest interactions first"
            )
        counts = np.asarray(histories.seen.sum(axis=0), dtype=np.float64).ravel()
        idf = np.log((n_users + 1) / (counts + 1)) + 1.0
        rows = sample_rows(n_users, max_users, seed)
        W = sparse.csr_matrix((recent if rows is None else recent[rows]) @ sparse.diags(idf))
        norms = np.sqrt(np.asarray(W.multiply(W).sum(axis=1)).ravel())
        W = sparse.csr_matrix(sparse.diags(1.0 / np.maximum(norms, 1e-12)) @ W)
        rank = max(1, min(dim, min(W.shape) - 1))
        _, _, vt = randomized_svd(W, rank, n_iter=7, random_state=seed)
        vectors = (idf[:, None] * vt.T).astype(np.float32)
        return cls(list(histories.item_ids), vectors, counts.astype(np.int64))

    def aligned(self, item_ids: Sequence[str]) -> np.ndarray:
        """Item vectors in the order of ``item_ids``; zero for items unknown at fit time (a
        newer item moves no one until the next run)."""
        out = np.zeros((len(item_ids), self.dim), dtype=np.float32)
        cols = pd.Index(self.item_ids).get_indexer(list(item_ids))
        known = cols >= 0
        out[known] = self.vectors[cols[known]]
        return out

    def project(self, histories: Histories) -> np.ndarray:
        """Every user's vector (zero for a user with no item known to the space)."""
        return sparse_mean_vectors(histories.recent, self.aligned(histories.item_ids))

    def of_items(
        self, item_ids: Sequence[str], weights: Sequence[float] | None = None
    ) -> np.ndarray:
        """The unit-length (weighted) sum of the items' vectors: a user with these items."""
        rows = self.aligned(item_ids)
        w = np.ones(len(rows)) if weights is None else np.asarray(weights, dtype=np.float64)
        total = (w[:, None] * rows).sum(axis=0) if len(rows) else np.zeros(self.dim)
        norm = float(np.linalg.norm(total))
        return (total / norm if norm > 0 else total).astype(np.float32)

    def of_categories(self, items: pd.DataFrame, categories: Sequence[str]) -> np.ndarray:
        """A newcomer who names only categories: the sum of those categories' items, each
        weighted by how many users had it, as if they had the category's usual items
        (zero when no known item has them)."""
        wanted = {c.casefold() for c in categories}
        has = items["categories"].map(lambda cats: any(str(c).casefold() in wanted for c in cats))
        chosen = items.loc[has.to_numpy(), "item_id"].astype(str).tolist()
        cols = pd.Index(self.item_ids).get_indexer(chosen)
        weights = np.where(cols >= 0, self.counts[np.maximum(cols, 0)], 0)
        return self.of_items(chosen, weights)


def user_vectors(
    represent: str,
    user_ids: Sequence[str],
    *,
    profile_texts: Mapping[str, str],
    histories: Histories | None,
    item_vectors: np.ndarray | None,
    encoder: Encoder,
    cache: VectorCache | None = None,
    space: CollabSpace | None = None,
) -> np.ndarray:
    """The vector each user is clustered and assigned by (see ``--represent``).

    ``histories`` (rows in ``user_ids`` order) and ``item_vectors`` (one per column) are
    needed for ``items`` and ``mix``; ``profile_texts`` for ``profile`` and ``mix``;
    ``histories`` and the fitted ``space`` for ``collab``.
    """
    if represent not in REPRESENTATIONS:
        raise InputError(
            f"--represent {represent!r}: unknown — choose one of {', '.join(REPRESENTATIONS)}"
        )
    if represent == "collab":
        assert histories is not None and space is not None
        return space.project(histories)
    profile_vecs = items_vecs = None
    if represent in ("profile", "mix"):
        profile_vecs = embed_texts([profile_texts[u] for u in user_ids], encoder, cache=cache)
    if represent in ("items", "mix"):
        assert histories is not None and item_vectors is not None
        items_vecs = sparse_mean_vectors(histories.recent, item_vectors)
    if profile_vecs is not None and items_vecs is not None:
        return mix_vectors(profile_vecs, items_vecs, MIX_WEIGHT)
    result = profile_vecs if profile_vecs is not None else items_vecs
    assert result is not None
    return result.astype(np.float32, copy=False)


def effective_min_size(requested: int, n_users: int, k: int) -> tuple[int, str | None]:
    """The privacy threshold actually applied, and a note when it was lowered.

    Only tiny populations (under 200 users, e.g. the example data) get a lower threshold:
    half the mean segment size, at least 2.
    """
    if n_users >= TINY_POPULATION:
        return requested, None
    lowered = max(2, n_users // (2 * k))
    if lowered >= requested:
        return requested, None
    return lowered, (
        f"--min-segment-size lowered from {requested} to {lowered}: only {n_users} users "
        "(tiny data); use at least 10 for real populations"
    )


def merge_small(
    X: np.ndarray, clustering: Clustering, min_size: int
) -> tuple[Clustering, list[str]]:
    """Reassign members of segments under ``min_size`` to the nearest remaining segment.

    Segment ids are renumbered 0..k'-1 by decreasing size; centroids, distances and
    variances are recomputed from the new membership.
    """
    sizes = np.bincount(clustering.labels[clustering.labels >= 0], minlength=clustering.k)
    keep = [j for j in range(clustering.k) if sizes[j] >= min_size]
    if len(keep) == clustering.k:
        return clustering, []
    if len(keep) < 2:
        raise InputError(
            f"--min-segment-size {min_size}: fewer than 2 segments would remain — lower it, "
            "lower --k, or use --small unnamed"
        )
    labels, _ = assign(X, clustering.centroids[keep])
    merged = [j for j in range(clustering.k) if j not in keep]
    rebuilt = _rebuild(X, clustering, labels, len(keep))
    note = (
        f"{len(merged)} segment(s) under {min_size} members merged into their nearest "
        f"segment ({int(sizes[merged].sum())} users moved)"
    )
    return rebuilt, [note]


def _rebuild(X: np.ndarray, clustering: Clustering, labels: np.ndarray, k: int) -> Clustering:
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
    relabel = np.empty(k, dtype=int)
    relabel[order] = np.arange(k)
    labels = relabel[labels]
    centroids = np.stack([X[labels == j].mean(axis=0) for j in range(k)]).astype(np.float32)
    diffs = X - centroids[labels]
    sq = np.einsum("ij,ij->i", diffs, diffs)
    sizes = np.bincount(labels, minlength=k)
    variances = np.array(
        [sq[labels == j].sum() / (sizes[j] - 1) if sizes[j] > 1 else np.nan for j in range(k)]
    )
    return replace(
        clustering,
        k=k,
        labels=labels,
        centroids=centroids,
        distances=np.sqrt(sq),
        variances=variances,
        sizes=sizes,
    )


@dataclass(frozen=True)
class SegmentFacts:
    segment_id: int
    size: int
    share: float
    top_items: list[dict[str, Any]]
    top_categories: list[dict[str, Any]]
    nearest: list[dict[str, Any]]
    silhouette: float
    stability: float
    variance: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "share": self.share,
            "top_items": self.top_items,
            "top_categories": self.top_categories,
            "nearest": self.nearest,
            "silhouette": _finite(self.silhouette),
            "stability": _finite(self.stability),
            "variance": _finite(self.variance),
        }


def _finite(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 4)


def segment_facts(
    clustering: Clustering,
    histories: Histories,
    *,
    items: pd.DataFrame,
    summaries: Mapping[str, str],
    stability: np.ndarray,
    top_n: int = 5,
    nearest_n: int = 3,
) -> list[SegmentFacts]:
    """Size, share, lift of items and categories over the population, nearest members.

    Counts are distinct members per item and per category, from sparse products (segment
    membership × user × item × category), so they cost no per-user Python.
    """
    user_ids = histories.user_ids
    n_users = len(user_ids)
    membership = _membership(clustering.labels, clustering.k)
    seen = histories.seen
    item_members = np.asarray((membership @ seen).todense())  # k × items
    item_users = np.asarray(seen.sum(axis=0)).ravel()
    categories, cat_names = category_matrix(items, histories.item_ids)
    user_cats = (seen @ categories) > 0
    cat_members = np.asarray((membership @ user_cats).todense())
    cat_users = np.asarray(user_cats.sum(axis=0)).ravel()
    titles = items.set_index("item_id")["title"]
    sizes = np.bincount(clustering.labels[clustering.labels >= 0], minlength=clustering.k)
    facts = []
    for j in range(clustering.k):
        size = int(sizes[j])
        top_items = _lift(item_members[j], item_users, histories.item_ids, size, n_users)
        top_cats = _lift(cat_members[j], cat_users, cat_names, size, n_users)
        member_rows = np.flatnonzero(clustering.labels == j)
        closest = member_rows[np.argsort(clustering.distances[member_rows], kind="stable")]
        facts.append(
            SegmentFacts(
                segment_id=j,
                size=size,
                share=round(size / n_users, 4) if n_users else 0.0,
                top_items=[
                    {"item_id": i, "title": str(titles.get(i, i)), "lift": lift, "members": n}
                    for i, lift, n in top_items[:top_n]
                ],
                top_categories=[
                    {"category": c, "lift": lift, "members": n} for c, lift, n in top_cats[:top_n]
                ],
                nearest=[
                    {
                        "user_id": user_ids[row],
                        "distance": round(float(clustering.distances[row]), 4),
                        "summary": summaries.get(user_ids[row], ""),
                    }
                    for row in closest[:nearest_n]
                ],
                silhouette=float(clustering.silhouette_per_cluster[j]),
                stability=float(stability[j]) if j < len(stability) else float("nan"),
                variance=float(clustering.variances[j]),
            )
        )
    return facts


def _membership(labels: np.ndarray, k: int) -> Any:
    """Sparse k × users matrix: 1 where the user is in the segment (noise belongs nowhere)."""
    from scipy import sparse

    rows = np.flatnonzero(labels >= 0)
    return sparse.csr_matrix(
        (np.ones(rows.size, dtype=np.float32), (labels[rows], rows)), shape=(k, len(labels))
    )


def category_matrix(items: pd.DataFrame, item_ids: Sequence[str]) -> tuple[Any, list[str]]:
    """Sparse item × category matrix (rows follow ``item_ids``) and the category names."""
    from scipy import sparse

    lists = items.set_index("item_id")["categories"].reindex(list(item_ids))
    long = lists.explode().dropna()
    names = sorted(set(long))
    cols = pd.Index(names).get_indexer(long.to_numpy())
    rows = pd.Index(list(item_ids)).get_indexer(long.index)
    matrix = sparse.csr_matrix(
        (np.ones(rows.size, dtype=np.float32), (rows, cols)), shape=(len(item_ids), len(names))
    )
    matrix.data[:] = 1.0  # an item listing a category twice still counts once
    return matrix, names


def category_shares(
    histories: Histories, items: pd.DataFrame, rows: np.ndarray
) -> dict[str, float]:
    """Share of each category among the items that the users in ``rows`` interacted with."""
    categories, names = category_matrix(items, histories.item_ids)
    per_item = np.asarray(histories.seen[rows].sum(axis=0)).ravel()
    counts = np.asarray(categories.T @ per_item).ravel()
    total = counts.sum()
    if total == 0:
        return {}
    order = np.argsort(-counts, kind="stable")
    return {names[c]: round(float(counts[c] / total), 4) for c in order if counts[c] > 0}


def _lift(
    in_segment: np.ndarray, overall: np.ndarray, keys: Sequence[str], size: int, n_users: int
) -> list[tuple[str, float, int]]:
    """(key, lift, members) sorted by lift; keys need ≥ 2 members and ≥ 10% of the segment,
    so a single member's quirk is not reported as the segment's taste."""
    if size == 0 or n_users == 0:
        return []
    floor = max(2, int(np.ceil(0.1 * size)))
    rows = []
    for c in np.flatnonzero(in_segment >= floor):
        count = int(in_segment[c])
        lift = (count / size) / (overall[c] / n_users)
        rows.append((str(keys[c]), round(float(lift), 3), count))
    rows.sort(key=lambda r: (-r[1], -r[2], r[0]))
    return rows


def assign_users(X: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest centroid (the seed article's argmin rule), its distance, and the margin."""
    labels, distances = assign(X, centroids)
    margins = margin(X, centroids) if len(centroids) > 1 else np.zeros(len(X))
    return labels, distances, margins
