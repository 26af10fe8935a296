"""k-nearest-neighbour accuracy of frozen features under cosine similarity."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.neighbors import KNeighborsClassifier

__all__ = ["knn_accuracy"]


def knn_accuracy(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, k: int | Sequence[int] = 20) -> dict[int, float]:
    """Majority-vote kNN accuracy (cosine distance, brute force) for each ``k``.

    Returns ``{k: accuracy}``; ``k`` larger than the training set is an error.
    """
    ks = [k] if isinstance(k, int) else list(k)
    if not ks or any(not isinstance(v, int) or v <= 0 for v in ks):
        raise ValueError(f"k must be a positive int or a list of them, got {k!r}")
    if max(ks) > len(train_labels):
        raise ValueError(f"k={max(ks)} exceeds the {len(train_labels)} training samples")
    out = {}
    for v in ks:
        clf = KNeighborsClassifier(n_neighbors=v, metric="cosine", algorithm="brute")
        clf.fit(train_features, train_labels)
        out[v] = float(clf.score(test_features, test_labels))
    return out
