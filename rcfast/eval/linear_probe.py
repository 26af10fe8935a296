"""Linear probe: multinomial logistic regression on standardised frozen features.

The regularisation strength ``C`` is chosen on a validation split carved from
the training features (stratified), then the probe is refit on all training
features with that ``C`` and scored on the test features. Given one ``C``, the
probe is fitted once on all training features.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

__all__ = ["linear_probe"]


def _check(features: np.ndarray, labels: np.ndarray, name: str) -> None:
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"{name}: features must be [N, D] and labels [N], got {features.shape} and {labels.shape}")
    if features.shape[0] == 0:
        raise ValueError(f"{name}: no samples")


def _fit(features, labels, C: float, max_iter: int, seed: int):
    scaler = StandardScaler().fit(features)
    # lbfgs fits the multinomial (softmax) model for more than two classes.
    model = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    # Probe problems are small (thousands x hundreds): each lbfgs iteration is a few
    # tiny BLAS calls, for which waking a BLAS thread pool costs more than it saves.
    with threadpool_limits(limits=1, user_api="blas"):
        model.fit(scaler.transform(features), labels)
    return scaler, model


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
                 val_fraction: float = 0.2, seed: int = 0, max_iter: int = 2000) -> dict:
    """Linear-probe accuracy of frozen features.

    With a single C there is nothing to choose: the probe is fitted once on
    all training features (``val_accuracy`` None, ``C_sweep`` empty).

    Returns ``{"accuracy", "best_C", "val_accuracy", "C_sweep": [[C, val_acc], ...]}``.
    """
    _check(train_features, train_labels, "train")
    _check(test_features, test_labels, "test")
    if not Cs or any(c <= 0 for c in Cs):
        raise ValueError(f"Cs must be a non-empty list of positive floats, got {Cs!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(np.unique(train_labels)) < 2:
        raise ValueError("train: a linear probe needs at least two classes")
    if len(Cs) == 1:  # nothing to choose: no validation split, one fit on all training features
        scaler, model = _fit(train_features, train_labels, float(Cs[0]), max_iter, seed)
        accuracy = float(model.score(scaler.transform(test_features), test_labels))
        return {"accuracy": accuracy, "best_C": float(Cs[0]), "val_accuracy": None, "C_sweep": []}
    counts = np.bincount(train_labels)
    stratify = train_labels if counts[counts > 0].min() >= 2 else None
    fit_x, val_x, fit_y, val_y = train_test_split(train_features, train_labels, test_size=val_fraction,
                                                  random_state=seed, stratify=stratify)
    sweep = []
    for C in Cs:
        scaler, model = _fit(fit_x, fit_y, float(C), max_iter, seed)
        sweep.append([float(C), float(model.score(scaler.transform(val_x), val_y))])
    best_C, best_val = max(sweep, key=lambda entry: entry[1])  # first C wins ties: the strongest regulariser
    scaler, model = _fit(train_features, train_labels, best_C, max_iter, seed)
    accuracy = float(model.score(scaler.transform(test_features), test_labels))
    return {"accuracy": accuracy, "best_C": best_C, "val_accuracy": best_val, "C_sweep": sweep}
