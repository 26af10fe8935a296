"""``student.init_from``: a student's backbone started from a classifier's or backbone's weights."""
from __future__ import annotations

import pytest
import torch

from helpers.fake_libs import fake_timm, fake_torchvision
from rcfast.models import build_classifier, build_model, build_student
from rcfast.train import ConfigError, atomic_save
from rcfast.train.init_from import init_student_from


def _assert_backbone_equals(student, state: dict, prefix: str = "") -> None:
    for key, value in student.backbone.state_dict().items():
        assert torch.equal(value, state[prefix + key]), key


@pytest.mark.parametrize("form", ["rcfast-final", "classifier-state-dict", "backbone-state-dict"])
def test_init_from_registered_backbones(tmp_path, form):
    torch.manual_seed(0)
    teacher = build_classifier("small_cnn", 7, width=4)
    if form == "rcfast-final":  # what a run's final.pt holds
        atomic_save({"model": teacher.state_dict(), "step": 3, "heads": {"names": ["logits"], "splits": [7]}},
                    tmp_path / "w.pt")
    elif form == "classifier-state-dict":
        torch.save(teacher.state_dict(), tmp_path / "w.pt")
    else:
        torch.save(teacher.backbone.state_dict(), tmp_path / "w.pt")
    torch.manual_seed(1)
    student = build_student("small_cnn", {"a": 3, "b": 5}, width=4)
    heads_before = student.heads.weight.clone()
    dropped = init_student_from(student, tmp_path / "w.pt")
    _assert_backbone_equals(student, teacher.backbone.state_dict())
    assert torch.equal(student.heads.weight, heads_before)  # the classifier is dropped, heads stay fresh
    assert dropped == ([] if form == "backbone-state-dict" else ["heads.weight", "heads.bias"])


def test_init_from_torchvision_and_timm_classifiers(tmp_path, monkeypatch):
    fake_torchvision(monkeypatch)
    fake_timm(monkeypatch)
    for name, classifier_keys in (("torchvision:resnet_fake", ["fc.weight", "fc.bias"]),
                                  ("timm:net_fake", ["head.fc.weight", "head.fc.bias"])):
        classifier = build_classifier(name, 11)
        torch.save(classifier.state_dict(), tmp_path / "clf.pt")
        student = build_student(name, {"a": 2})
        assert init_student_from(student, tmp_path / "clf.pt") == classifier_keys
        _assert_backbone_equals(student, classifier.state_dict())
        # a backbone's own state_dict (no classifier) loads as well
        torch.save(build_model(name).state_dict(), tmp_path / "bb.pt")
        assert init_student_from(student, tmp_path / "bb.pt") == []


def test_init_from_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
    torch.save(build_classifier("small_cnn", 4, width=8).state_dict(), tmp_path / "wide.pt")
    student = build_student("small_cnn", {"a": 3}, width=4)
    with pytest.raises(ConfigError, match=r"student.init_from: .*wide\.pt does not fit .*shape mismatches .*"
                                          r"'body\.0\.weight: \(8, 3, 3, 3\) vs \(4, 3, 3, 3\)'"):
        init_student_from(student, tmp_path / "wide.pt")
    state = build_model("small_cnn", width=4).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["body.0.weight"]
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(ConfigError, match=r"missing keys \['body\.0\.weight'\], unexpected keys \['extra\.weight'\]"):
        init_student_from(student, tmp_path / "odd.pt")


def test_init_from_refuses_code_and_missing_files(tmp_path):
    student = build_student("small_cnn", {"a": 3}, width=4)
    torch.save({"model": {"w": torch.zeros(1)}, "hook": print}, tmp_path / "code.pt")
    with pytest.raises(ConfigError, match="not a loadable weights-only checkpoint"):
        init_student_from(student, tmp_path / "code.pt")
    with pytest.raises(FileNotFoundError, match="student.init_from: checkpoint file .*nope.pt does not exist"):
        init_student_from(student, tmp_path / "nope.pt")
