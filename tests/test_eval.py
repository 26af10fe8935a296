"""Transfer evaluation: separable toy problems score high, random labels score near chance."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import TensorProxy, toy_images
from rcfast.eval import evaluate_transfer, extract_features, finetune_accuracy, knn_accuracy, linear_probe
from rcfast.models import build_model


def _blobs(n: int, classes: int, dim: int, seed: int, separation: float = 4.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * separation
    labels = rng.integers(0, classes, size=n)
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def test_linear_probe_and_knn_on_a_separable_problem():
    x, y = _blobs(600, 5, 32, seed=0)
    probe = linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert probe["accuracy"] >= 0.97
    assert probe["best_C"] in (0.01, 0.1, 1.0, 10.0) and len(probe["C_sweep"]) == 4
    knn = knn_accuracy(x[:400], y[:400], x[400:], y[400:], k=[1, 10])
    assert set(knn) == {1, 10} and min(knn.values()) >= 0.97


def test_random_labels_give_chance_accuracy():
    x, _ = _blobs(1200, 5, 32, seed=1)
    y = np.random.default_rng(2).integers(0, 4, size=1200)  # labels independent of the features
    probe = linear_probe(x[:800], y[:800], x[800:], y[800:])
    knn = knn_accuracy(x[:800], y[:800], x[800:], y[800:], k=10)
    # chance is 0.25; 400 test samples put its 3-sigma band at about +-0.065
    assert 0.15 <= probe["accuracy"] <= 0.35
    assert 0.15 <= knn[10] <= 0.35


def test_probe_and_knn_reject_bad_input():
    x, y = _blobs(50, 3, 4, seed=3)
    with pytest.raises(ValueError, match="features must be"):
        linear_probe(x, y[:10], x, y)
    with pytest.raises(ValueError, match="Cs"):
        linear_probe(x, y, x, y, Cs=[0.0])
    with pytest.raises(ValueError, match="k=100 exceeds"):
        knn_accuracy(x, y, x, y, k=100)


def test_extract_features_restores_mode_and_orders_labels():
    images, labels = toy_images(20, 4, image_size=8, seed=0)
    backbone = build_model("small_cnn", width=4)
    backbone.train()
    data = TensorProxy(images, labels, batch_size=6, labels=True, drop_last=False)
    feats, got = extract_features(backbone, data)
    assert feats.shape == (20, 16) and feats.dtype == np.float32 and got.shape == (20,)
    assert backbone.training
    assert sorted(got.tolist()) == sorted(labels.tolist())
    with pytest.raises(ValueError, match=r"\(images, labels\)"):
        extract_features(backbone, [images[:4]])


def test_evaluate_transfer_with_finetune_learns_a_separable_image_task():
    torch.manual_seed(0)
    x, y = toy_images(160, 4, image_size=8, seed=5)
    train = TensorProxy(x[:120], y[:120], batch_size=20, labels=True, drop_last=False)
    test = TensorProxy(x[120:], y[120:], batch_size=40, labels=True, drop_last=False)
    backbone = build_model("small_cnn", width=8)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    result = evaluate_transfer(backbone, train, test, knn_k=[5], finetune_epochs=4, finetune_lr=3e-3)
    assert set(result) == {"linear_probe", "linear_probe_C", "knn@5", "finetune"}
    # class prototypes + noise: even random conv features separate them
    assert result["linear_probe"] >= 0.9 and result["knn@5"] >= 0.8
    assert result["finetune"] >= 0.8
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())  # the caller's copy is untouched


def test_finetune_rejects_zero_epochs():
    x, y = toy_images(8, 2, image_size=8)
    data = TensorProxy(x, y, batch_size=4, labels=True)
    with pytest.raises(ValueError, match="epochs"):
        finetune_accuracy(build_model("small_cnn", width=4), data, data, 2, epochs=0)


def test_probe_with_one_C_fits_once_on_all_training_features():
    x, y = _blobs(300, 3, 8, seed=4)
    probe = linear_probe(x[:200], y[:200], x[200:], y[200:], Cs=[0.5])
    assert probe["best_C"] == 0.5 and probe["val_accuracy"] is None and probe["C_sweep"] == []
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x[:200])
    expected = LogisticRegression(C=0.5, max_iter=2000, random_state=0).fit(scaler.transform(x[:200]), y[:200])
    assert probe["accuracy"] == expected.score(scaler.transform(x[200:]), y[200:])
    # Two images per class suffice (a sweep would need a validation image of each class besides).
    two = np.concatenate([np.flatnonzero(y[:200] == c)[:2] for c in range(3)])
    assert 0.0 <= linear_probe(x[two], y[two], x[200:], y[200:], Cs=[1.0])["accuracy"] <= 1.0
