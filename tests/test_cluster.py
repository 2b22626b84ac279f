"""Clustering: determinism, planted structure, the per-segment figures, assignment, errors."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, silhouette_score

from segrec.cluster import (
    ALGORITHMS,
    assign,
    bootstrap_stability,
    choose_k,
    cluster_vectors,
    margin,
    seed_ari,
)
from segrec.errors import InputError


def unit_blobs(
    n: int = 300, k: int = 5, dim: int = 384, spread: float = 0.5, seed: int = 7
) -> tuple[np.ndarray, np.ndarray]:
    """k well-separated gaussian blobs on the unit sphere; returns vectors and true labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = np.arange(n) % k
    X = centres[truth] + rng.standard_normal((n, dim)) * spread / np.sqrt(dim)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), truth


def uniform_sphere(n: int = 300, dim: int = 384, seed: int = 11) -> np.ndarray:
    X = np.random.default_rng(seed).standard_normal((n, dim))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    return unit_blobs()


# --- determinism and planted structure ---------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_same_input_and_seed_give_identical_labels(algorithm: str, blobs):
    X, _ = blobs
    noisy = X + uniform_sphere(len(X), seed=3) * 0.3  # overlapping enough that seeds matter
    first = cluster_vectors(noisy, k=5, algorithm=algorithm, seed=42)
    second = cluster_vectors(noisy, k=5, algorithm=algorithm, seed=42)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.centroids, second.centroids)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_recovers_planted_blobs(algorithm: str, blobs):
    X, truth = blobs
    result = cluster_vectors(X, k=5, algorithm=algorithm, seed=0)
    assert result.k == 5
    assert adjusted_rand_score(truth, result.labels) == pytest.approx(1.0)
    assert result.centroids.shape == (5, 384)
    assert result.centroids.dtype == np.float32
    assert result.sizes.tolist() == [60] * 5
    assert result.silhouette > 0.5
    assert result.silhouette_per_cluster.shape == (5,)


def test_pca_clusters_in_components_but_keeps_centroids_in_original_space(blobs):
    X, truth = blobs
    result = cluster_vectors(X, k=5, seed=0, pca=10)
    assert adjusted_rand_score(truth, result.labels) == pytest.approx(1.0)
    assert result.centroids.shape == (5, 384)
    assert result.params["pca"] == 10
    assert 0.0 < result.params["pca_explained_variance"] <= 1.0
    for j in range(5):
        np.testing.assert_allclose(
            result.centroids[j], X[result.labels == j].mean(axis=0), atol=1e-5
        )


def test_choose_k_recovers_the_planted_number(blobs):
    X, _ = blobs
    choice = choose_k(X, k_min=2, k_max=8, n_boot=3)
    assert choice.k == 5
    assert [row["k"] for row in choice.curve] == list(range(2, 9))
    by_k = {row["k"]: row for row in choice.curve}
    assert by_k[5]["stability"] > 0.9
    assert by_k[5]["silhouette"] == max(row["silhouette"] for row in choice.curve)


def test_choose_k_clips_the_range_to_n_minus_1():
    X = unit_blobs(n=6, k=2, seed=1)[0]
    choice = choose_k(X, k_min=2, k_max=10, n_boot=2)
    assert [row["k"] for row in choice.curve] == [2, 3, 4, 5]


# --- per-segment figures by hand ---------------------------------------------------------


def test_centroids_distances_and_variances_by_hand():
    X = np.array([[0, 0], [2, 0], [10, 10], [10, 12], [10, 14]], dtype=np.float32)
    result = cluster_vectors(X, k=2, seed=0)
    a = result.labels[0]
    b = result.labels[2]
    assert result.labels.tolist() == [a, a, b, b, b]
    np.testing.assert_allclose(result.centroids[a], [1, 0])
    np.testing.assert_allclose(result.centroids[b], [10, 12])
    np.testing.assert_allclose(result.distances, [1, 1, 2, 0, 2])
    # s_j^2 = sum ||e_u - c_j||^2 / (N_j - 1): (1 + 1) / 1 and (4 + 0 + 4) / 2
    assert result.variances[a] == pytest.approx(2.0)
    assert result.variances[b] == pytest.approx(4.0)
    assert result.sizes[a] == 2 and result.sizes[b] == 3


def test_variance_is_nan_for_a_singleton():
    X = np.array([[0, 0], [0, 1], [100, 100]], dtype=np.float32)
    result = cluster_vectors(X, k=2, seed=0)
    single = result.labels[2]
    assert np.isnan(result.variances[single])
    assert result.distances[2] == 0.0
    assert result.variances[1 - single] == pytest.approx(0.5)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_an_empty_kmeans_cluster_still_gets_a_centroid():
    X = np.repeat(np.array([[0.0, 0.0], [4.0, 0.0]], dtype=np.float32), 10, axis=0)
    result = cluster_vectors(X, k=3, seed=0)
    assert sorted(result.sizes.tolist()) == [0, 10, 10]
    assert np.isfinite(result.centroids).all()
    empty = int(np.flatnonzero(result.sizes == 0)[0])
    assert np.isnan(result.variances[empty])


def test_silhouette_is_sklearns_cosine_silhouette(blobs):
    X, _ = blobs
    noisy = X + uniform_sphere(len(X), seed=5)
    result = cluster_vectors(noisy, k=4, seed=0)
    expected = silhouette_score(noisy, result.labels, metric="cosine")
    assert result.silhouette == pytest.approx(expected, abs=1e-5)
    assert result.params["silhouette_metric"] == "cosine"
    assert result.params["silhouette_sample"] is None


def test_silhouette_samples_large_inputs_and_says_so():
    X = unit_blobs(n=10_050, k=3, dim=8, spread=0.2)[0]
    result = cluster_vectors(X, k=3, algorithm="minibatch", seed=0)
    assert result.params["silhouette_sample"] == 10_000
    assert result.silhouette > 0.5


def test_hdbscan_marks_noise_and_reports_the_clusters_it_found(blobs):
    X, _ = blobs
    outliers = uniform_sphere(4, seed=99) * 5.0
    result = cluster_vectors(np.vstack([X, outliers]), k=None, algorithm="hdbscan")
    assert result.k == 5
    assert (result.labels[-4:] == -1).all()
    assert np.isnan(result.distances[-4:]).all()
    assert np.isfinite(result.distances[:-4]).all()
    assert result.sizes.sum() == len(X)
    assert result.params["noise"] == 4


# --- assignment ------------------------------------------------------------------------


CENTROIDS = np.array([[0.0, 0.0], [10.0, 0.0]], dtype=np.float32)


def test_assign_and_margin_by_hand():
    X = np.array([[1, 0], [9, 0], [4, 3], [5, 0]], dtype=np.float32)
    labels, distances = assign(X, CENTROIDS)
    assert labels.tolist() == [0, 1, 0, 0]  # the tie at x=5 goes to the lower label
    np.testing.assert_allclose(distances, [1, 1, 5, 5])
    np.testing.assert_allclose(margin(X, CENTROIDS), [8, 8, np.hypot(6, 3) - 5, 0], atol=1e-9)


def test_assigning_the_members_again_reproduces_kmeans_labels(blobs):
    X, _ = blobs
    result = cluster_vectors(X, k=5, seed=0)
    labels, distances = assign(X, result.centroids)
    np.testing.assert_array_equal(labels, result.labels)
    np.testing.assert_allclose(distances, result.distances, atol=1e-5)
    assert (margin(X, result.centroids) > 0.5).all()


# --- stability ---------------------------------------------------------------------------


def test_bootstrap_stability_is_high_on_blobs_and_low_on_noise(blobs):
    X, _ = blobs
    clean = bootstrap_stability(X, cluster_vectors(X, k=5, seed=0), n_boot=5)
    assert clean.shape == (5,)
    assert (clean > 0.9).all()
    noise = uniform_sphere()
    noisy = bootstrap_stability(noise, cluster_vectors(noise, k=5, seed=0), n_boot=5)
    assert noisy.mean() < 0.75
    assert noisy.mean() < clean.mean() - 0.2


def test_bootstrap_stability_is_reproducible():
    noise = uniform_sphere()
    clustering = cluster_vectors(noise, k=4, seed=0)
    first = bootstrap_stability(noise, clustering, n_boot=3, seed=1)
    second = bootstrap_stability(noise, clustering, n_boot=3, seed=1)
    np.testing.assert_array_equal(first, second)


def test_seed_ari_is_one_on_blobs_and_lower_on_noise(blobs):
    X, _ = blobs
    assert seed_ari(X, k=5) == pytest.approx(1.0)
    assert seed_ari(uniform_sphere(), k=5, seeds=(0, 1, 2)) < 0.5
    assert seed_ari(X, k=5, algorithm="minibatch", seeds=(0, 1), pca=10) == pytest.approx(1.0)


# --- bad input ---------------------------------------------------------------------------


X_SMALL = unit_blobs(n=20, k=2, dim=4)[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"X": X_SMALL, "k": 1}, r"k=1: need at least 2"),
        ({"X": X_SMALL, "k": 21}, r"k=21: more segments than the 20 vectors"),
        ({"X": X_SMALL, "k": None}, r"k is required for algorithm 'kmeans'"),
        (
            {"X": X_SMALL, "k": 2, "algorithm": "dbscan"},
            r"'dbscan': unknown; choose one of kmeans, minibatch, hdbscan, agglomerative",
        ),
        ({"X": np.empty((0, 4), dtype=np.float32), "k": 2}, r"empty array of shape \(0, 4\)"),
        ({"X": X_SMALL[0], "k": 2}, r"expected a 2-D array .* got shape \(4,\)"),
        ({"X": X_SMALL[None], "k": 2}, r"expected a 2-D array"),
        ({"X": X_SMALL.tolist(), "k": 2}, r"expected a numpy array, got list"),
        ({"X": np.where(np.eye(20, 4) > 0, np.nan, X_SMALL), "k": 2}, r"row 0 contains NaN"),
        ({"X": X_SMALL, "k": 2, "pca": 5}, r"pca=5: must be between 1 and 4"),
        ({"X": X_SMALL, "k": 2, "algorithm": "hdbscan", "min_cluster_size": 1}, r"at least 2"),
    ],
)
def test_cluster_vectors_rejects_bad_input(kwargs: dict, message: str):
    with pytest.raises(InputError, match=message) as error:
        cluster_vectors(**kwargs)
    assert "\n" not in str(error.value)


def test_agglomerative_refuses_inputs_too_big_for_its_memory():
    X = np.zeros((20_001, 2), dtype=np.float32)
    with pytest.raises(InputError, match="20001 exceeds 20000: use kmeans or minibatch"):
        cluster_vectors(X, k=2, algorithm="agglomerative")


def test_hdbscan_with_no_cluster_says_how_to_fix():
    X = uniform_sphere(30, dim=16)
    with pytest.raises(InputError, match=r"all noise.*lower it or use kmeans"):
        cluster_vectors(X, k=None, algorithm="hdbscan", min_cluster_size=25)


def test_assign_and_margin_reject_bad_input():
    with pytest.raises(InputError, match="dimension 3 but the centroids 2"):
        assign(np.ones((2, 3), dtype=np.float32), CENTROIDS)
    with pytest.raises(InputError, match="centroids: 1 given, need at least 2"):
        margin(np.ones((2, 2), dtype=np.float32), CENTROIDS[:1])
    with pytest.raises(InputError, match="X_new: row 1 contains NaN"):
        assign(np.array([[0, 0], [np.nan, 0]]), CENTROIDS)


def test_stability_helpers_reject_bad_input():
    clustering = cluster_vectors(X_SMALL, k=2)
    with pytest.raises(InputError, match="X has 19 rows but the clustering has 20 labels"):
        bootstrap_stability(X_SMALL[:19], clustering)
    with pytest.raises(InputError, match="sample_frac=0: must be in"):
        bootstrap_stability(X_SMALL, clustering, sample_frac=0)
    with pytest.raises(InputError, match="n_boot=0"):
        bootstrap_stability(X_SMALL, clustering, n_boot=0)
    with pytest.raises(InputError, match="need at least 2 different seeds"):
        seed_ari(X_SMALL, k=2, seeds=(1, 1))
    with pytest.raises(InputError, match="hdbscan finds its own number"):
        choose_k(X_SMALL, algorithm="hdbscan")
    with pytest.raises(InputError, match=r"k range 25\.\.30: empty for 20 vectors"):
        choose_k(X_SMALL, k_min=25, k_max=30)
    with pytest.raises(InputError, match="k_min=1"):
        choose_k(X_SMALL, k_min=1)
