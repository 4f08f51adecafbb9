"""Key geometry on synthetic keys with known clusters, centers, dormancy and trajectories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from somoe.analysis.galaxy import cluster_keys, cluster_usage, dormancy_history, galactic_centers, pca_2d, tsne_2d
from somoe.analysis.keys import CheckpointKeys, LayerKeys
from somoe.analysis.trajectories import key_trajectories


def clustered_keys(n_clusters=4, per=12, dim=16, noise=0.08, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    truth = np.repeat(np.arange(n_clusters), per)
    keys = centers[truth] + noise * rng.standard_normal((truth.size, dim))
    order = rng.permutation(truth.size)  # shuffled, so cluster id is not the expert index
    return keys[order] * rng.uniform(0.5, 2.0, (truth.size, 1)), truth[order]  # norms vary: direction counts


@pytest.mark.parametrize("method", ["kmeans", "agglomerative"])
def test_clustering_recovers_known_galaxies_and_picks_k(method):
    keys, truth = clustered_keys()
    found = cluster_keys(keys, method=method)  # k chosen by silhouette
    assert found.k == 4
    assert adjusted_rand_score(truth, found.labels) >= 0.9
    assert sorted(found.sizes()) == [12, 12, 12, 12] and found.silhouette > 0.5
    fixed = cluster_keys(keys, k=2, method=method)
    assert fixed.k == 2 and fixed.sizes()[0] >= fixed.sizes()[1]  # labels ordered by size


def test_projections_keep_clusters_apart():
    keys, truth = clustered_keys(n_clusters=3, per=15, seed=1)
    for xy in (pca_2d(keys)[0], tsne_2d(keys)):
        assert xy.shape == (45, 2)
        # clusters must stay separable in the plane: k-means on the 2-D points recovers them
        labels = cluster_keys(xy, k=3, normalize=False).labels
        assert adjusted_rand_score(truth, labels) >= 0.9
    _, variance = pca_2d(keys)
    assert 0.5 < variance.sum() <= 1.0  # three directions: two components hold most of the spread


def test_galactic_centers_and_cluster_usage_by_hand():
    usage = np.array([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])  # 1/E = 0.1667
    assert galactic_centers(usage).tolist() == [0]  # >= 2/E = 0.333
    assert galactic_centers(usage, factor=1.0).tolist() == [0, 1]  # >= 1/E, busiest first
    keys = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.05, 1], [1, 0.05]], dtype=float)
    clustering = cluster_keys(keys, k=2)
    shares = cluster_usage(clustering, usage)
    assert sum(shares) == pytest.approx(1.0)
    assert shares[clustering.labels[0]] == pytest.approx(0.5 + 0.2 + 0.05)  # experts 0, 1, 5 point along x


def _state(step, streaks, keys=None):
    E = len(streaks)
    keys = np.eye(E) if keys is None else keys
    layer = LayerKeys(0, keys, np.full(E, 1.0 / E), np.array(streaks))
    return CheckpointKeys(Path(f"step-{step}"), step, step * 10, {0: layer})


def test_dormancy_history_how_long_and_recovery():
    states = [_state(100, [0, 0, 0, 1]), _state(200, [0, 3, 0, 4]), _state(300, [0, 0, 2, 9])]
    records = {r.expert: r for r in dormancy_history(states, 0)}
    assert set(records) == {1, 2, 3}  # expert 0 never dormant
    assert (records[1].longest_streak, records[1].dormant_now, records[1].recovered) == (3, False, True)
    assert (records[3].first_seen_step, records[3].longest_streak, records[3].dormant_now) == (100, 9, True)
    assert records[2].first_seen_step == 300 and not records[2].recovered


def test_trajectories_share_one_projection_and_measure_moves():
    rng = np.random.default_rng(3)
    k0 = rng.standard_normal((8, 6))
    k0 /= np.linalg.norm(k0, axis=1, keepdims=True)
    k1 = k0.copy()
    k1[0] = -k1[0]  # one key flips: moves a chord of length 2; the others stay
    tr = key_trajectories([_state(1, [0] * 8, k0), _state(2, [0] * 8, k0), _state(3, [0] * 8, k1)], 0)
    assert tr.coords.shape == (3, 8, 2) and tr.steps == [1, 2, 3]
    assert np.allclose(tr.coords[0], tr.coords[1])  # unchanged keys land on the same points
    assert np.allclose(tr.coords[2, 1:], tr.coords[0, 1:])
    assert tr.drift == pytest.approx([0.0, 2.0 / 8])
