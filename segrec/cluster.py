"""Cluster user vectors into segments, and measure how real the segments are.

Pure functions over numpy arrays: no store, no printing. Every clusterer gets the seed, so
the same input and seed give identical labels. Centroids always live in the original
embedding space (even when clustering ran on PCA components), because a new user is
assigned by the seed article's rule: the nearest centroid by Euclidean distance.

Large inputs are handled without float64 copies of the whole matrix: sums, distances and
assignments are computed in row chunks, and scikit-learn's k-means accepts float32 as is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from segrec.errors import InputError

ALGORITHMS = ("kmeans", "minibatch", "hdbscan", "agglomerative")
AUTO = "auto"
KMEANS_N_INIT = 3
"""k-means restarts (best inertia kept) unless a caller asks for more (``n_init``)."""
MINIBATCH_SIZE = 4096
MINIBATCH_ABOVE = 50_000
"""``--algorithm auto`` uses MiniBatchKMeans above this many users, plain k-means up to it."""
SILHOUETTE_MAX_POINTS = 10_000
STABILITY_MAX_POINTS = 20_000
"""Bootstrap stability and the k scan recluster a seeded sample of at most this many rows."""
AGGLOMERATIVE_MAX_POINTS = 20_000
STABILITY_THRESHOLD = 0.6
_CHUNK_ROWS = 16_384


@dataclass
class Clustering:
    """One clustering run: labels, centroids and the quality figures stored with a segment."""

    algorithm: str
    k: int
    seed: int
    params: dict[str, Any]
    labels: np.ndarray
    centroids: np.ndarray
    distances: np.ndarray
    variances: np.ndarray
    sizes: np.ndarray
    silhouette: float
    silhouette_per_cluster: np.ndarray


@dataclass
class KChoice:
    """The chosen k and the curve it was chosen from (for the CLI to show); ``sample`` is the
    number of rows scanned when that was a sample (None: every row)."""

    k: int
    curve: list[dict[str, float]] = field(default_factory=list)
    sample: int | None = None


def _check_matrix(X: np.ndarray, name: str = "X") -> np.ndarray:
    """Validate a vector matrix; return it as float32 (no copy when it already is)."""
    if not isinstance(X, np.ndarray):
        raise InputError(f"{name}: expected a numpy array, got {type(X).__name__}")
    if X.ndim != 2:
        raise InputError(f"{name}: expected a 2-D array (rows × dim), got shape {X.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise InputError(f"{name}: empty array of shape {X.shape}; embed some vectors first")
    X = np.asarray(X, dtype=np.float32)
    for start, block in _chunks(X):
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            row = start + int(np.argmin(finite))
            raise InputError(
                f"{name}: row {row} contains NaN or infinity; re-embed or drop that row"
            )
    return X


def resolve_algorithm(algorithm: str, n: int) -> str:
    """``auto`` → minibatch above MINIBATCH_ABOVE vectors, kmeans up to it; others as given."""
    if algorithm != AUTO:
        _check_algorithm(algorithm)
        return algorithm
    return "minibatch" if n > MINIBATCH_ABOVE else "kmeans"


def sample_rows(n: int, limit: int, seed: int) -> np.ndarray | None:
    """Sorted row indices of a seeded sample of ``limit`` of ``n`` rows; None if n ≤ limit."""
    if n <= limit:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise InputError(f"algorithm {algorithm!r}: unknown; choose one of {', '.join(ALGORITHMS)}")


def _check_k(k: int | None, n: int, algorithm: str) -> None:
    if algorithm == "hdbscan":
        return
    if k is None:
        raise InputError(
            f"k is required for algorithm {algorithm!r}; give a number of segments "
            "or use choose_k (--k auto)"
        )
    if k < 2:
        raise InputError(f"k={k}: need at least 2 segments")
    if k > n:
        raise InputError(f"k={k}: more segments than the {n} vectors; use k <= {n}")


def _chunks(X: np.ndarray, rows: int = _CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, X.shape[0], rows):
        yield start, X[start : start + rows]


def _fit_labels(
    X: np.ndarray,
    *,
    algorithm: str,
    k: int | None,
    seed: int,
    pca: int | None,
    min_cluster_size: int,
    n_init: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Fit one clusterer; return labels, centres in the original space if any, and params.

    The centres are only used for clusters that end up empty (k-means can leave one), so
    that every segment still has a centroid to assign new users to.
    """
    from sklearn.cluster import HDBSCAN, AgglomerativeClustering, KMeans, MiniBatchKMeans
    from sklearn.decomposition import PCA

    if pca is not None and not 1 <= pca <= min(X.shape):
        raise InputError(f"pca={pca}: must be between 1 and {min(X.shape)} for {X.shape}")
    if algorithm == "agglomerative" and X.shape[0] > AGGLOMERATIVE_MAX_POINTS:
        raise InputError(
            f"agglomerative clustering needs memory quadratic in the number of vectors; "
            f"{X.shape[0]} exceeds {AGGLOMERATIVE_MAX_POINTS}: use kmeans or minibatch"
        )
    if algorithm == "hdbscan" and min_cluster_size < 2:
        raise InputError(f"min_cluster_size={min_cluster_size}: must be at least 2")
    restarts = KMEANS_N_INIT if n_init is None else n_init
    if restarts < 1:
        raise InputError(f"n_init={n_init}: need at least 1 k-means restart")

    params: dict[str, Any] = {"pca": pca}
    Z = X
    reducer = None
    if pca is not None:
        reducer = PCA(n_components=pca, random_state=seed)
        Z = reducer.fit_transform(X).astype(np.float32, copy=False)
        params["pca_explained_variance"] = float(reducer.explained_variance_ratio_.sum())

    centres: np.ndarray | None = None
    if algorithm == "kmeans":
        model = KMeans(n_clusters=k, n_init=restarts, random_state=seed)
        labels = model.fit_predict(Z)
        centres = model.cluster_centers_
        params["n_init"] = restarts
    elif algorithm == "minibatch":
        model = MiniBatchKMeans(
            n_clusters=k, batch_size=MINIBATCH_SIZE, n_init=restarts, random_state=seed
        )
        labels = model.fit_predict(Z)
        centres = model.cluster_centers_
        params.update(n_init=restarts, batch_size=MINIBATCH_SIZE)
    elif algorithm == "agglomerative":
        labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(Z)
        params["linkage"] = "ward"
    else:
        labels = HDBSCAN(min_cluster_size=min_cluster_size, copy=True).fit_predict(Z)
        params["min_cluster_size"] = min_cluster_size
    if centres is not None and reducer is not None:
        centres = reducer.inverse_transform(centres)
    return np.asarray(labels, dtype=np.int64), centres, params


def _centroids(
    X: np.ndarray, labels: np.ndarray, k: int, fallback: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Member means in the original space, summed in float64 one chunk at a time."""
    from scipy import sparse

    sums = np.zeros((k, X.shape[1]), dtype=np.float64)
    for start, block in _chunks(X):
        block_labels = labels[start : start + block.shape[0]]
        keep = np.flatnonzero(block_labels >= 0)
        members = sparse.csr_matrix(
            (np.ones(keep.size), (block_labels[keep], keep)), shape=(k, block.shape[0])
        )
        sums += members @ block.astype(np.float64)
    sizes = np.bincount(labels[labels >= 0], minlength=k)
    centroids = np.zeros_like(sums)
    np.divide(sums, sizes[:, None], out=centroids, where=sizes[:, None] > 0)
    empty = sizes == 0
    if empty.any() and fallback is not None:
        centroids[empty] = fallback[empty]
    return centroids.astype(np.float32), sizes


def _own_distances(X: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Euclidean distance of every row to its own centroid; NaN for noise (label -1)."""
    out = np.full(X.shape[0], np.nan, dtype=np.float64)
    for start, block in _chunks(X):
        block_labels = labels[start : start + block.shape[0]]
        keep = block_labels >= 0
        diff = block[keep].astype(np.float64) - centroids[block_labels[keep]]
        out[start : start + block.shape[0]][keep] = np.linalg.norm(diff, axis=1)
    return out


def _silhouette(
    X: np.ndarray, labels: np.ndarray, k: int, seed: int
) -> tuple[float, np.ndarray, int | None]:
    """Cosine silhouette over non-noise points, on a seeded sample when there are many.

    Returns the mean, the per-cluster means (NaN for a cluster with no sampled point) and
    the sample size (None when every point was used).
    """
    from sklearn import config_context
    from sklearn.metrics import silhouette_samples

    per_cluster = np.full(k, np.nan)
    rows = np.flatnonzero(labels >= 0)
    sample_size = None
    if rows.size > SILHOUETTE_MAX_POINTS:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(rows, size=SILHOUETTE_MAX_POINTS, replace=False))
        sample_size = SILHOUETTE_MAX_POINTS
    sample_labels = labels[rows]
    n_labels = np.unique(sample_labels).size
    if not 2 <= n_labels <= rows.size - 1:
        return float("nan"), per_cluster, sample_size
    # A small working memory keeps the chunked distance matrix to ~128 MiB, not 1 GiB.
    with config_context(working_memory=128):
        values = silhouette_samples(X[rows], sample_labels, metric="cosine")
    counts = np.bincount(sample_labels, minlength=k)
    sums = np.bincount(sample_labels, weights=values, minlength=k)
    np.divide(sums, counts, out=per_cluster, where=counts > 0)
    return float(values.mean()), per_cluster, sample_size


def cluster_vectors(
    X: np.ndarray,
    *,
    k: int | None,
    algorithm: str = "kmeans",
    seed: int = 0,
    pca: int | None = None,
    min_cluster_size: int = 5,
    n_init: int | None = None,
) -> Clustering:
    """Cluster rows of X into k segments and compute everything a segment stores.

    ``pca`` reduces to that many components before clustering (HDBSCAN and Ward need it
    for speed on large inputs); centroids, distances, variances and the silhouette are
    always computed on the original vectors. For HDBSCAN ``k`` is ignored and reported
    as the number of clusters found; noise gets label -1. The silhouette uses a seeded
    sample of at most 10,000 points (``params["silhouette_sample"]`` says when).
    ``n_init``: k-means restarts (default KMEANS_N_INIT), kept in ``params``.
    """
    _check_algorithm(algorithm)
    X = _check_matrix(X)
    _check_k(k, X.shape[0], algorithm)
    labels, centres, params = _fit_labels(
        X,
        algorithm=algorithm,
        k=k,
        seed=seed,
        pca=pca,
        min_cluster_size=min_cluster_size,
        n_init=n_init,
    )
    n_clusters = int(labels.max()) + 1 if algorithm == "hdbscan" else int(k or 0)
    if n_clusters == 0:
        raise InputError(
            f"hdbscan found no cluster in {X.shape[0]} vectors (all noise) with "
            f"min_cluster_size={min_cluster_size}: lower it or use kmeans"
        )
    centroids, sizes = _centroids(X, labels, n_clusters, centres)
    distances = _own_distances(X, labels, centroids)
    squares = np.bincount(
        labels[labels >= 0], weights=distances[labels >= 0] ** 2, minlength=n_clusters
    )
    variances = np.full(n_clusters, np.nan)
    np.divide(squares, sizes - 1, out=variances, where=sizes >= 2)
    silhouette, per_cluster, sample_size = _silhouette(X, labels, n_clusters, seed)
    params.update(silhouette_metric="cosine", silhouette_sample=sample_size)
    if algorithm == "hdbscan":
        params["noise"] = int((labels < 0).sum())
    return Clustering(
        algorithm=algorithm,
        k=n_clusters,
        seed=seed,
        params=params,
        labels=labels,
        centroids=centroids,
        distances=distances,
        variances=variances,
        sizes=sizes,
        silhouette=silhouette,
        silhouette_per_cluster=per_cluster,
    )


def bootstrap_stability(
    X: np.ndarray,
    clustering: Clustering,
    *,
    n_boot: int = 10,
    sample_frac: float = 0.8,
    seed: int = 0,
    max_points: int = STABILITY_MAX_POINTS,
) -> np.ndarray:
    """Per-cluster stability in [0, 1], after Hennig's clusterboot.

    Above ``max_points`` rows the rounds run on one seeded sample of that many rows (each
    recluster costs a full fit; at a million users ten of them would dominate the run).

    Each round subsamples ``sample_frac`` of the rows without replacement and reclusters
    them with the same algorithm, k and parameters but another seed. A cluster scores its
    best Jaccard overlap with any new cluster, on the sampled rows; the result is the mean
    over rounds (NaN for a cluster never sampled). Hennig reads > 0.75 as stable and
    < 0.5 as dissolved.
    """
    X = _check_matrix(X)
    if X.shape[0] != clustering.labels.shape[0]:
        raise InputError(
            f"X has {X.shape[0]} rows but the clustering has {clustering.labels.shape[0]} "
            "labels; pass the vectors that were clustered"
        )
    if n_boot < 1:
        raise InputError(f"n_boot={n_boot}: need at least 1 bootstrap round")
    if not 0.0 < sample_frac <= 1.0:
        raise InputError(f"sample_frac={sample_frac}: must be in (0, 1]")
    sampled = sample_rows(X.shape[0], max_points, seed)
    original = clustering.labels if sampled is None else clustering.labels[sampled]
    if sampled is not None:
        X = X[sampled]
    n = X.shape[0]
    m = round(n * sample_frac)
    k = clustering.k
    if m < max(2, k if clustering.algorithm != "hdbscan" else 2):
        raise InputError(
            f"sample_frac={sample_frac} leaves {m} of {n} rows, too few to recluster into "
            f"{k} clusters; raise sample_frac"
        )
    rng = np.random.default_rng(seed)
    scores = np.full((n_boot, k), np.nan)
    for round_ in range(n_boot):
        rows = np.sort(rng.choice(n, size=m, replace=False))
        boot_seed = int(rng.integers(0, 2**31 - 1))
        if boot_seed == clustering.seed:
            boot_seed += 1
        boot_labels, _, _ = _fit_labels(
            X[rows],
            algorithm=clustering.algorithm,
            k=clustering.k,
            seed=boot_seed,
            pca=clustering.params.get("pca"),
            min_cluster_size=clustering.params.get("min_cluster_size", 5),
            n_init=clustering.params.get("n_init"),
        )
        scores[round_] = _best_jaccard(original[rows], boot_labels, k)
    with np.errstate(all="ignore"):
        counts = np.isfinite(scores).sum(axis=0)
        totals = np.nansum(scores, axis=0)
    out = np.full(k, np.nan)
    np.divide(totals, counts, out=out, where=counts > 0)
    return out


def _best_jaccard(original: np.ndarray, boot: np.ndarray, k: int) -> np.ndarray:
    """For each original cluster, the best Jaccard index with any bootstrap cluster.

    Noise (-1) is no cluster on either side, but an original member the bootstrap calls
    noise still counts in the union.
    """
    k_boot = int(boot.max(initial=-1)) + 1
    a_sizes = np.bincount(original[original >= 0], minlength=k)
    best = np.full(k, np.nan)
    if k_boot == 0:
        best[a_sizes > 0] = 0.0
        return best
    both = (original >= 0) & (boot >= 0)
    intersection = np.zeros((k, k_boot), dtype=np.int64)
    np.add.at(intersection, (original[both], boot[both]), 1)
    b_sizes = np.bincount(boot[boot >= 0], minlength=k_boot)
    union = a_sizes[:, None] + b_sizes[None, :] - intersection
    jaccard = np.divide(intersection, union, out=np.zeros(union.shape), where=union > 0)
    best[a_sizes > 0] = jaccard.max(axis=1)[a_sizes > 0]
    return best


def seed_ari(
    X: np.ndarray,
    *,
    k: int,
    algorithm: str = "kmeans",
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    pca: int | None = None,
    min_cluster_size: int = 5,
    n_init: int | None = None,
) -> float:
    """Mean adjusted Rand index over all pairs of clusterings from different seeds.

    PROTOCOL track 4b: 1.0 means the segmentation does not depend on the seed.
    """
    _check_algorithm(algorithm)
    X = _check_matrix(X)
    _check_k(k, X.shape[0], algorithm)
    if len(set(seeds)) < 2:
        raise InputError(f"seeds {list(seeds)}: need at least 2 different seeds")
    from sklearn.metrics import adjusted_rand_score

    runs = [
        _fit_labels(
            X,
            algorithm=algorithm,
            k=k,
            seed=seed,
            pca=pca,
            min_cluster_size=min_cluster_size,
            n_init=n_init,
        )[0]
        for seed in dict.fromkeys(seeds)
    ]
    return float(np.mean([adjusted_rand_score(a, b) for a, b in combinations(runs, 2)]))


def choose_k(
    X: np.ndarray,
    *,
    k_min: int = 2,
    k_max: int = 10,
    algorithm: str = "kmeans",
    seed: int = 0,
    n_boot: int = 5,
    pca: int | None = None,
    max_points: int = STABILITY_MAX_POINTS,
    n_init: int | None = None,
) -> KChoice:
    """Pick the number of segments from silhouette and bootstrap stability.

    Above ``max_points`` rows the scan runs on one seeded sample of that many rows.

    Rule: scan k from ``k_min`` to ``k_max`` (clipped to n - 1); for each, cluster with
    the given seed and score the cosine silhouette and the mean per-cluster bootstrap
    stability (``n_boot`` rounds). Among the k whose mean stability is at least 0.6 choose
    the best silhouette; if no k is that stable, the best silhouette overall. Ties go to
    the smaller k. Stability guards against a k that merely splits noise well once.
    """
    _check_algorithm(algorithm)
    if algorithm == "hdbscan":
        raise InputError("choose_k: hdbscan finds its own number of clusters; give no k")
    X = _check_matrix(X)
    sampled = sample_rows(X.shape[0], max_points, seed)
    if sampled is not None:
        X = X[sampled]
    n = X.shape[0]
    top = min(k_max, n - 1)
    if k_min < 2:
        raise InputError(f"k_min={k_min}: need at least 2 segments")
    if k_min > top:
        raise InputError(
            f"k range {k_min}..{k_max}: empty for {n} vectors (k can be at most {n - 1})"
        )
    curve: list[dict[str, float]] = []
    for k in range(k_min, top + 1):
        clustering = cluster_vectors(X, k=k, algorithm=algorithm, seed=seed, pca=pca, n_init=n_init)
        stability = bootstrap_stability(
            X, clustering, n_boot=n_boot, seed=seed, max_points=max_points
        )
        finite = stability[np.isfinite(stability)]
        curve.append(
            {
                "k": k,
                "silhouette": clustering.silhouette,
                "stability": float(finite.mean()) if finite.size else float("nan"),
            }
        )

    def silhouette_of(row: dict[str, float]) -> float:
        value = row["silhouette"]
        return value if np.isfinite(value) else -np.inf

    stable = [row for row in curve if row["stability"] >= STABILITY_THRESHOLD]
    best = max(stable or curve, key=silhouette_of)
    return KChoice(
        k=int(best["k"]), curve=curve, sample=None if sampled is None else int(sampled.size)
    )


def _centroid_distances(X: np.ndarray, centroids: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Euclidean distances of each chunk of rows to every centroid, in float64."""
    C = centroids.astype(np.float64)
    c_norms = (C**2).sum(axis=1)
    for start, block in _chunks(X):
        B = block.astype(np.float64)
        squared = (B**2).sum(axis=1)[:, None] - 2.0 * B @ C.T + c_norms[None, :]
        yield start, np.sqrt(np.maximum(squared, 0.0))


def centroid_distances(X_new: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(rows × centroids) Euclidean distances, computed in row chunks (float32 result)."""
    X_new = _check_assign(X_new, centroids, 1)
    out = np.empty((X_new.shape[0], centroids.shape[0]), dtype=np.float32)
    for start, D in _centroid_distances(X_new, centroids):
        out[start : start + D.shape[0]] = D
    return out


def _check_assign(X_new: np.ndarray, centroids: np.ndarray, need: int) -> np.ndarray:
    X_new = _check_matrix(X_new, "X_new")
    centroids = _check_matrix(centroids, "centroids")
    if X_new.shape[1] != centroids.shape[1]:
        raise InputError(
            f"X_new has dimension {X_new.shape[1]} but the centroids {centroids.shape[1]}; "
            "embed with the encoder the segments were built with"
        )
    if centroids.shape[0] < need:
        raise InputError(f"centroids: {centroids.shape[0]} given, need at least {need}")
    return X_new


def assign(X_new: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by Euclidean distance (the seed article's argmin rule).

    Returns the labels and the distance to the chosen centroid; ties go to the lower label.
    """
    X_new = _check_assign(X_new, centroids, 1)
    labels = np.empty(X_new.shape[0], dtype=np.int64)
    distances = np.empty(X_new.shape[0], dtype=np.float64)
    for start, D in _centroid_distances(X_new, centroids):
        rows = slice(start, start + D.shape[0])
        labels[rows] = D.argmin(axis=1)
        distances[rows] = D[np.arange(D.shape[0]), labels[rows]]
    return labels, distances


def margin(X_new: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Distance to the second-nearest centroid minus the nearest: how sure an assignment is."""
    X_new = _check_assign(X_new, centroids, 2)
    out = np.empty(X_new.shape[0], dtype=np.float64)
    for start, D in _centroid_distances(X_new, centroids):
        two = np.partition(D, 1, axis=1)[:, :2]
        out[start : start + D.shape[0]] = two[:, 1] - two[:, 0]
    return out
