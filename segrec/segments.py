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

from segrec.cluster import Clustering, assign, margin
from segrec.embed import Encoder, VectorCache, embed_texts, mean_item_vectors, mix_vectors
from segrec.errors import InputError

Representation = Literal["profile", "items", "mix"]
REPRESENTATIONS: tuple[str, ...] = ("profile", "items", "mix")
RECENT_ITEMS = 30  # the items vector is the mean of a user's 30 most recent items
MIX_WEIGHT = 0.5  # share of the profile vector in "mix"
TINY_POPULATION = 200  # below this many users the privacy threshold is lowered (and said so)


def item_matrix(
    items: pd.DataFrame, encoder: Encoder, cache: VectorCache | None = None
) -> np.ndarray:
    """Embeddings of every item's text, in the order of ``items``."""
    return embed_texts(list(items["text"]), encoder, cache=cache)


def recent_item_indices(
    interactions: pd.DataFrame, item_index: Mapping[str, int], user_ids: Sequence[str]
) -> list[list[int]]:
    """Per user, row indices of their most recent distinct items (interactions are
    expected oldest first within each user, as the store returns them)."""
    grouped = interactions.groupby("user_id", sort=False)["item_id"]
    histories: dict[str, list[str]] = {u: list(items) for u, items in grouped}
    out = []
    for user in user_ids:
        recent = list(dict.fromkeys(reversed(histories.get(user, []))))[:RECENT_ITEMS]
        out.append([item_index[i] for i in recent if i in item_index])
    return out


def user_vectors(
    represent: str,
    user_ids: Sequence[str],
    *,
    profile_texts: Mapping[str, str],
    interactions: pd.DataFrame,
    item_ids: Sequence[str],
    item_vectors: np.ndarray | None,
    encoder: Encoder,
    cache: VectorCache | None = None,
) -> np.ndarray:
    """The vector each user is clustered and assigned by (see ``--represent``)."""
    if represent not in REPRESENTATIONS:
        raise InputError(
            f"--represent {represent!r}: unknown — choose one of {', '.join(REPRESENTATIONS)}"
        )
    profile_vecs = items_vecs = None
    if represent in ("profile", "mix"):
        profile_vecs = embed_texts([profile_texts[u] for u in user_ids], encoder, cache=cache)
    if represent in ("items", "mix"):
        assert item_vectors is not None
        index = {item: row for row, item in enumerate(item_ids)}
        histories = recent_item_indices(interactions, index, user_ids)
        items_vecs = mean_item_vectors(item_vectors, histories)
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
    user_ids: Sequence[str],
    *,
    interactions: pd.DataFrame,
    items: pd.DataFrame,
    summaries: Mapping[str, str],
    stability: np.ndarray,
    top_n: int = 5,
    nearest_n: int = 3,
) -> list[SegmentFacts]:
    """Size, share, lift of items and categories over the population, nearest members."""
    n_users = len(user_ids)
    label_of = dict(zip(user_ids, clustering.labels.tolist(), strict=True))
    pairs = interactions[["user_id", "item_id"]].drop_duplicates()
    pairs = pairs[pairs["user_id"].isin(label_of)]
    pairs = pairs.assign(segment=pairs["user_id"].map(label_of))
    titles = items.set_index("item_id")["title"]
    categories = items.set_index("item_id")["categories"]
    item_users = pairs.groupby("item_id")["user_id"].nunique()
    cat_pairs = pairs.assign(category=pairs["item_id"].map(categories)).explode("category")
    cat_pairs = cat_pairs.dropna(subset=["category"])
    cat_users = cat_pairs.groupby("category")["user_id"].nunique()
    facts = []
    for j in range(clustering.k):
        members = [u for u, label in label_of.items() if label == j]
        size = len(members)
        mine = pairs[pairs["segment"] == j]
        top_items = _lift(mine.groupby("item_id")["user_id"].nunique(), item_users, size, n_users)
        mine_cats = cat_pairs[cat_pairs["segment"] == j]
        top_cats = _lift(
            mine_cats.groupby("category")["user_id"].nunique(), cat_users, size, n_users
        )
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


def _lift(
    in_segment: pd.Series, overall: pd.Series, size: int, n_users: int
) -> list[tuple[str, float, int]]:
    """(key, lift, members) sorted by lift; keys need ≥ 2 members and ≥ 10% of the segment,
    so a single member's quirk is not reported as the segment's taste."""
    if size == 0 or n_users == 0:
        return []
    floor = max(2, int(np.ceil(0.1 * size)))
    rows = []
    for key, count in in_segment.items():
        if count < floor:
            continue
        lift = (count / size) / (overall[key] / n_users)
        rows.append((str(key), round(float(lift), 3), int(count)))
    rows.sort(key=lambda r: (-r[1], -r[2], r[0]))
    return rows


def assign_users(X: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest centroid (the seed article's argmin rule), its distance, and the margin."""
    labels, distances = assign(X, centroids)
    margins = margin(X, centroids) if len(centroids) > 1 else np.zeros(len(X))
    return labels, distances, margins
