"""Key geometry of a SoME layer: 2-D projections, clusters ("knowledge galaxies"), centers, dormancy.

Keys are compared by direction: routing scores are cosine whenever ``key_norm``
is on (every shipped SoME preset), so clustering and projections work on
L2-normalised keys unless told otherwise. Needs scikit-learn (``pip install
-e ".[analysis]"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ConfigError
from .keys import CheckpointKeys

CENTER_FACTOR = 2.0  # a "galactic center" routes at least this multiple of the uniform share 1/E


def _sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ConfigError("key analysis needs scikit-learn; pip install -e '.[analysis]'") from None


def unit_rows(keys: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(keys, axis=1, keepdims=True)
    return keys / np.maximum(norms, 1e-12)


def pca_2d(keys: np.ndarray, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(E x 2 coordinates, explained-variance ratio of the two components)."""
    _sklearn()
    from sklearn.decomposition import PCA

    x = unit_rows(keys) if normalize else keys
    pca = PCA(n_components=2, random_state=0).fit(x)
    return pca.transform(x), pca.explained_variance_ratio_


def tsne_2d(keys: np.ndarray, normalize: bool = True, seed: int = 0) -> np.ndarray:
    """E x 2 t-SNE embedding (cosine metric; perplexity capped below E/3 so small E works)."""
    _sklearn()
    from sklearn.manifold import TSNE

    x = unit_rows(keys) if normalize else keys
    perplexity = float(min(30.0, max(2.0, (x.shape[0] - 1) / 3.0)))
    return TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca",
                random_state=seed).fit_transform(x)


@dataclass
class Clustering:
    labels: np.ndarray  # E, cluster id per expert (0 = largest cluster)
    k: int
    silhouette: float  # of the chosen k (cosine); -1 when k = 1
    method: str

    def sizes(self) -> list[int]:
        return [int((self.labels == c).sum()) for c in range(self.k)]


def cluster_keys(keys: np.ndarray, k: int | None = None, method: str = "kmeans", k_max: int = 12,
                 normalize: bool = True, seed: int = 0) -> Clustering:
    """Cluster keys with k-means or agglomerative (average linkage, cosine).

    ``k=None`` picks k in 2..k_max by the best silhouette score (cosine), the
    usual model-free choice; labels are renumbered by cluster size, largest first.
    """
    _sklearn()
    from sklearn.cluster import AgglomerativeClustering, KMeans
    from sklearn.metrics import silhouette_score

    if method not in ("kmeans", "agglomerative"):
        raise ConfigError(f"cluster method {method!r} is unknown; use kmeans or agglomerative")
    x = unit_rows(keys) if normalize else keys
    E = x.shape[0]

    def fit(n: int) -> np.ndarray:
        if method == "kmeans":
            return KMeans(n_clusters=n, n_init=10, random_state=seed).fit_predict(x)
        return AgglomerativeClustering(n_clusters=n, metric="cosine", linkage="average").fit_predict(x)

    if E < 3:
        return Clustering(np.zeros(E, dtype=np.int64), 1, -1.0, method)
    candidates = [k] if k else list(range(2, min(k_max, E - 1) + 1))
    best = None
    for n in candidates:
        labels = fit(n)
        score = silhouette_score(x, labels, metric="cosine") if len(set(labels)) > 1 else -1.0
        if best is None or score > best[0]:
            best = (score, n, labels)
    score, n, labels = best
    order = np.argsort([-(labels == c).sum() for c in range(n)], kind="stable")
    relabel = np.empty(n, dtype=np.int64)
    relabel[order] = np.arange(n)
    return Clustering(relabel[labels], n, float(score), method)


def galactic_centers(usage: np.ndarray, factor: float = CENTER_FACTOR) -> np.ndarray:
    """Experts whose usage share is at least ``factor`` times the uniform 1/E, busiest first."""
    usage = np.asarray(usage, dtype=np.float64)
    idx = np.flatnonzero(usage >= factor / usage.size)
    return idx[np.argsort(-usage[idx], kind="stable")]


@dataclass
class DormancyRecord:
    expert: int
    first_seen_step: int  # first analysed checkpoint at which it was dormant
    longest_streak: int  # longest run of self-organizing updates spent dormant (from the layer's counter)
    dormant_now: bool  # dormant at the last analysed checkpoint
    recovered: bool  # dormant at some checkpoint, active at a later one


def dormancy_history(states: list[CheckpointKeys], layer: int) -> list[DormancyRecord]:
    """Experts that were dormant at any analysed checkpoint of ``layer``: how long, and whether they recovered."""
    records: dict[int, DormancyRecord] = {}
    for state in states:
        lk = state.layers.get(layer)
        if lk is None:
            continue
        for e in range(lk.num_experts):
            streak = int(lk.dormant_streak[e])
            rec = records.get(e)
            if streak > 0:
                if rec is None:
                    rec = records[e] = DormancyRecord(e, state.step, 0, True, False)
                rec.longest_streak = max(rec.longest_streak, streak)
                rec.dormant_now = True
            elif rec is not None and rec.dormant_now:
                rec.dormant_now, rec.recovered = False, True
    # an expert dormant now may also have recovered earlier and relapsed: 'recovered' keeps the first recovery
    return sorted(records.values(), key=lambda r: (not r.dormant_now, -r.longest_streak, r.expert))


def cluster_usage(clustering: Clustering, usage: np.ndarray) -> list[float]:
    """Share of routed slots that each cluster takes (sums to 1)."""
    usage = np.asarray(usage, dtype=np.float64)
    total = usage.sum() or 1.0
    return [float(usage[clustering.labels == c].sum() / total) for c in range(clustering.k)]
