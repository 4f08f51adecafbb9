"""Key movement across checkpoints in one shared 2-D projection.

A separate PCA per checkpoint would rotate and flip its axes freely, so the
points of different checkpoints would not be comparable. One PCA is fitted on
the keys of all checkpoints together and applied to each, so a key's path in
the plane is its actual movement (along the two main directions of variation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .galaxy import _sklearn, unit_rows
from .keys import CheckpointKeys


@dataclass
class Trajectories:
    layer: int
    steps: list[int]
    coords: np.ndarray  # C x E x 2 (checkpoint, expert, plane)
    drift: np.ndarray  # C-1: mean distance the (unit) keys moved between consecutive checkpoints, full space


def key_trajectories(states: list[CheckpointKeys], layer: int, normalize: bool = True) -> Trajectories:
    """Shared-PCA coordinates of ``layer``'s keys at each checkpoint that has the layer."""
    _sklearn()
    from sklearn.decomposition import PCA

    kept = [s for s in states if layer in s.layers]
    keys_CED = np.stack([s.layers[layer].keys for s in kept])
    if normalize:
        keys_CED = np.stack([unit_rows(k) for k in keys_CED])
    C, E, D = keys_CED.shape
    pca = PCA(n_components=2, random_state=0).fit(keys_CED.reshape(C * E, D))
    coords = pca.transform(keys_CED.reshape(C * E, D)).reshape(C, E, 2)
    drift = np.linalg.norm(np.diff(keys_CED, axis=0), axis=2).mean(axis=1) if C > 1 else np.zeros(0)
    return Trajectories(layer, [s.step for s in kept], coords, drift)
