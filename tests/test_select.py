"""``rcfast.select``: teacher outputs, the prototype cost matrix, the OT / LEEP / linear-probe
scores, and ``rank_teachers``."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.proxy import TensorProxy
from torch import nn

from rcfast.models import build_classifier, classifier_backbone
from rcfast.select import (class_cost_matrix, classifier_outputs, final_linear, leep_score, linear_probe_score,
                           ot_score, prototype_cost, rank_teachers)

NUM_CLASSES, SIDE = 4, 6
PIXELS = 3 * SIDE * SIDE


def target_sample(num=160, noise=1.5, seed=0):
    """Images around one random prototype per class, and their labels."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(NUM_CLASSES, PIXELS, generator=g)
    labels = torch.arange(num) % NUM_CLASSES
    images = prototypes[labels] + noise * torch.randn(num, PIXELS, generator=g)
    return images.view(num, 3, SIDE, SIDE), labels, prototypes


def linear_teacher(projection, classifier):
    """images -> flatten -> projection (features) -> ReLU -> classifier (logits)."""
    features = nn.Linear(PIXELS, projection.shape[0], bias=False)
    head = nn.Linear(projection.shape[0], classifier.shape[0])
    with torch.no_grad():
        features.weight.copy_(projection)
        head.weight.copy_(classifier)
        head.bias.zero_()
    return nn.Sequential(nn.Flatten(), features, nn.ReLU(), head)


def teachers_of_known_relatedness(prototypes, seed=1):
    """``related``: features are the target prototypes, its six classes two copies of the four
    target classes; ``shuffled``: the same features with a random classifier; ``unrelated``:
    random features and classifier."""
    g = torch.Generator().manual_seed(seed)
    aligned = prototypes / prototypes.norm(dim=1, keepdim=True)
    return {
        "unrelated": linear_teacher(torch.randn(NUM_CLASSES, PIXELS, generator=g) / math.sqrt(PIXELS),
                                    torch.randn(6, NUM_CLASSES, generator=g)),
        "related": linear_teacher(aligned, 3.0 * torch.eye(NUM_CLASSES)[[0, 1, 2, 3, 0, 1]]),
        "shuffled": linear_teacher(aligned, torch.randn(6, NUM_CLASSES, generator=g)),
    }


# --------------------------------------------------------------------------- outputs
def test_features_are_what_classifier_backbone_gives_and_one_pass_per_batch():
    images, labels, _ = target_sample(num=37)
    model = build_classifier("small_cnn", 5, num_channels=3, width=4)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    model.train()
    out = classifier_outputs(model, images, labels, batch_size=16)
    assert len(calls) == 3 and model.training  # ceil(37 / 16) passes; the mode is restored
    backbone = classifier_backbone(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(out.features, backbone(images))
        torch.testing.assert_close(out.logits, model.eval()(images))
    assert torch.equal(out.labels, labels) and out.weight.shape == (5, 16)


def test_a_teacher_must_end_in_a_linear_layer():
    with pytest.raises(ValueError, match=r"teacher 'soft': its last module is Softmax, not an nn.Linear"):
        final_linear(nn.Sequential(nn.Flatten(), nn.Linear(PIXELS, 3), nn.Softmax(dim=1)), "teacher 'soft'")
    with pytest.raises(ValueError, match="its last module is Conv2d"):
        final_linear(nn.Sequential(nn.Conv2d(3, 2, 3)))
    with pytest.raises(TypeError, match="must be an nn.Module"):
        final_linear(lambda x: x)

    class Twice(nn.Module):  # the classifier runs twice: not a plain classifier
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(PIXELS, PIXELS)

        def forward(self, x):
            return self.fc(self.fc(x.flatten(1)))

    images, labels, _ = target_sample(num=8)
    with pytest.raises(ValueError, match="ran 2 times"):
        classifier_outputs(Twice(), images, labels)


# --------------------------------------------------------------------------- cost matrix
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_prototype_cost_by_hand(metric):
    g = torch.Generator().manual_seed(2)
    features, weight = torch.randn(30, 5, generator=g), torch.randn(7, 5, generator=g)
    labels = torch.arange(30) % 3
    cost = prototype_cost(features, labels, weight, metric=metric)
    assert cost.shape == (7, 3) and cost.dtype == torch.float32
    expected = np.zeros((7, 3))
    for k in range(7):
        for c in range(3):
            mu = features[labels == c].double().mean(0).numpy()
            w = weight[k].double().numpy()
            if metric == "cosine":
                expected[k, c] = (1 - w @ mu / np.linalg.norm(w) / np.linalg.norm(mu)) / 2
            else:
                expected[k, c] = np.linalg.norm(w - mu)
    if metric == "euclidean":
        expected /= expected.max()
        assert cost.max().item() == pytest.approx(1.0)
    np.testing.assert_allclose(cost.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert (cost >= 0).all() and (cost <= 1).all()


def test_class_cost_matrix_from_tensors_or_a_labeled_iterable():
    images, labels, prototypes = target_sample()
    teacher = teachers_of_known_relatedness(prototypes)["related"]
    cost = class_cost_matrix(teacher, images, labels)
    assert cost.shape == (6, NUM_CLASSES)
    # teacher class k is target class k % 4: the cheapest target of each teacher class
    assert torch.equal(cost.argmin(dim=1), torch.arange(6) % NUM_CLASSES)
    data = TensorProxy(images, labels, batch_size=32, labels=True, drop_last=False)
    torch.testing.assert_close(class_cost_matrix(teacher, data, num_classes=NUM_CLASSES), cost)


def test_labels_are_checked():
    images, labels, prototypes = target_sample(num=40)
    teacher = teachers_of_known_relatedness(prototypes)["related"]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), found 9"):
        class_cost_matrix(teacher, images, torch.where(labels == 3, 9, labels), num_classes=4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), found -1"):
        class_cost_matrix(teacher, images, labels - 1, num_classes=4)
    with pytest.raises(ValueError, match=r"class \[2\] of 4 has no sample"):
        class_cost_matrix(teacher, images, torch.where(labels == 2, 1, labels), num_classes=4)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        class_cost_matrix(teacher, images, labels.float())
    with pytest.raises(ValueError, match="one label per image"):
        class_cost_matrix(teacher, images, labels[:-1])
    with pytest.raises(ValueError, match="metric must be one of"):
        class_cost_matrix(teacher, images, labels, metric="manhattan")


# --------------------------------------------------------------------------- scores
def test_ot_score_is_the_expected_cost_for_one_hot_targets_and_pot_when_smoothed():
    ot = pytest.importorskip("ot")
    g = torch.Generator().manual_seed(3)
    teacher_logits, labels = torch.randn(20, 6, generator=g), torch.arange(20) % 3
    cost = torch.rand(6, 3, generator=g)
    probs = torch.softmax(teacher_logits.double() / 2.0, dim=1)
    expected = (probs * cost.double()[:, labels].T).sum(dim=1).mean()
    assert ot_score(teacher_logits, labels, cost, temperature=2.0) == pytest.approx(expected.item(), rel=1e-9)
    target = 0.8 * torch.nn.functional.one_hot(labels, 3).double() + 0.2 / 3
    pot = np.mean([ot.sinkhorn2(probs[i].numpy(), target[i].numpy(), cost.double().numpy(), 0.05, stopThr=1e-9)
                   for i in range(20)])
    smoothed = ot_score(teacher_logits, labels, cost, temperature=2.0, label_smoothing=0.2, tol=1e-9)
    assert smoothed == pytest.approx(pot, rel=1e-6)
    with pytest.raises(ValueError, match="cost must be"):
        ot_score(teacher_logits, labels, cost.T)


def test_leep_against_a_loop_over_the_definition():
    g = torch.Generator().manual_seed(4)
    teacher_logits, labels = torch.randn(25, 5, generator=g) * 2, torch.arange(25) % 3
    theta = torch.softmax(teacher_logits.double(), dim=1).numpy()
    y = labels.numpy()
    joint = np.zeros((3, 5))
    for i in range(25):
        joint[y[i]] += theta[i] / 25
    conditional = joint / joint.sum(axis=0, keepdims=True)
    expected = np.mean([np.log(sum(conditional[y[i], z] * theta[i, z] for z in range(5))) for i in range(25)])
    assert leep_score(teacher_logits, labels) == pytest.approx(expected, rel=1e-12)
    # a confident teacher whose classes are the target classes: LEEP -> 0, its maximum
    assert leep_score(torch.nn.functional.one_hot(labels, 3).double() * 50, labels) > -1e-9


def test_linear_probe_score_separates_informative_from_noise_features():
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(120) % 3
    informative = torch.nn.functional.one_hot(labels, 3).float() * 3 + 0.3 * torch.randn(120, 3, generator=g)
    noise = torch.randn(120, 3, generator=g)
    assert linear_probe_score(informative, labels) == 1.0
    assert linear_probe_score(noise, labels) < 0.7


# --------------------------------------------------------------------------- ranking
@pytest.mark.parametrize("method", ["ot", "leep", "linear_probe"])
def test_rank_teachers_orders_known_relatedness(method):
    images, labels, prototypes = target_sample()
    teachers = teachers_of_known_relatedness(prototypes)
    calls = {name: [] for name in teachers}
    for name, teacher in teachers.items():
        teacher.register_forward_pre_hook(lambda *_, name=name: calls[name].append(torch.is_inference_mode_enabled()))
    records = rank_teachers(teachers, images, labels, method=method, batch_size=64)
    assert all(c == [True] * 3 for c in calls.values())  # each teacher: one pass (3 batches), inference mode
    assert [r.rank for r in records] == [1, 2, 3]
    assert all(r.method == method and r.seconds > 0 and r.cost_matrix.shape == (6, NUM_CLASSES) for r in records)
    scores = [r.score for r in records]
    assert scores == (sorted(scores) if method == "ot" else sorted(scores, reverse=True))
    order = [r.name for r in records]
    assert order[0] == "related"
    if method != "linear_probe":  # the probe sees features only: related and shuffled share them
        assert order == ["related", "shuffled", "unrelated"]


def test_rank_teachers_checks_everything_before_running_a_teacher():
    images, labels, prototypes = target_sample(num=40)
    teachers = teachers_of_known_relatedness(prototypes)
    calls = []
    teachers["related"].register_forward_pre_hook(lambda *_: calls.append(1))
    bad = dict(teachers, soft=nn.Sequential(nn.Flatten(), nn.Linear(PIXELS, 3), nn.Softmax(dim=1)))
    with pytest.raises(ValueError, match="teacher 'soft': its last module is Softmax"):
        rank_teachers(bad, images, labels)
    with pytest.raises(ValueError, match="method must be one of"):
        rank_teachers(teachers, images, labels, method="knn")
    with pytest.raises(ValueError, match="non-empty mapping"):
        rank_teachers({}, images, labels)
    with pytest.raises(ValueError, match="has no sample"):
        rank_teachers(teachers, images, labels, num_classes=5)
    assert not calls


def test_rank_teachers_on_a_labeled_iterable_needs_a_fixed_order():
    images, labels, prototypes = target_sample(num=64)
    teachers = teachers_of_known_relatedness(prototypes)
    fixed = [(images[i:i + 16], labels[i:i + 16]) for i in range(0, 64, 16)]  # the same batches every pass
    by_tensors = rank_teachers(teachers, images, labels)
    by_iterable = rank_teachers(teachers, fixed, num_classes=NUM_CLASSES)
    assert [r.name for r in by_iterable] == [r.name for r in by_tensors]
    for a, b in zip(by_iterable, by_tensors):
        assert a.score == pytest.approx(b.score, rel=1e-5)
    # TensorProxy reshuffles every epoch: each teacher would see another order
    with pytest.raises(ValueError, match="different labels for teacher 'related'"):
        rank_teachers(teachers, TensorProxy(images, labels, batch_size=16, labels=True, drop_last=False),
                      num_classes=NUM_CLASSES)


def test_a_missing_extra_is_named_before_any_teacher_runs(monkeypatch):
    import rcfast.extras

    images, labels, prototypes = target_sample(num=40)
    teachers = teachers_of_known_relatedness(prototypes)
    calls = []
    teachers["related"].register_forward_pre_hook(lambda *_: calls.append(1))
    monkeypatch.setattr(rcfast.extras, "_importable", lambda module: module != "sklearn")
    with pytest.raises(rcfast.extras.MissingExtraError, match=r"linear_probe.*scikit-learn.*rcfast\[train\]"):
        rank_teachers(teachers, images, labels, method="linear_probe")
    assert not calls
    assert rank_teachers(teachers, images, labels, method="leep")  # the others need no extra
