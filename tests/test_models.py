"""MultiHeadStudent (packed heads), the built-in backbones and the model registry."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import rcfast
from helpers.fake_libs import fake_torchvision
from rcfast.models import (MultiHeadStudent, ResNetBackbone, SmallCNN, available_models, build_classifier,
                           build_model, build_student, classifier_backbone, register_model, resnet18_backbone)

HEADS = {"task_a": 5, "task_b": 3, "generalist": 10}


def _student(seed: int = 0) -> MultiHeadStudent:
    torch.manual_seed(seed)
    return build_student("small_cnn", HEADS, width=4)


def test_heads_are_one_packed_linear():
    student = _student()
    linears = [m for m in student.modules() if isinstance(m, nn.Linear)]
    assert linears == [student.heads]
    assert student.heads.in_features == student.feature_dim == 16
    assert student.heads.out_features == sum(HEADS.values())
    assert student.head_names == tuple(HEADS)
    assert student.splits == tuple(HEADS.values())
    packed = student(torch.randn(6, 3, 16, 16))
    assert packed.shape == (6, 18)


def test_head_logits_are_views_of_the_packed_output():
    student = _student()
    packed = student(torch.randn(4, 3, 16, 16))
    heads = student.head_logits(packed)
    assert list(heads) == list(HEADS)
    start = 0
    for name, size in HEADS.items():
        assert heads[name].shape == (4, size)
        assert heads[name].untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
        torch.testing.assert_close(heads[name], packed[:, start:start + size], rtol=0, atol=0)
        start += size
    with pytest.raises(ValueError, match="packed must be"):
        student.head_logits(packed[:, :5])


def test_packed_loss_equals_sum_of_per_head_losses_and_gradients():
    """One GEMM + one fused loss call == separate heads, separate losses, summed."""
    student = _student()
    images = torch.randn(8, 3, 16, 16)
    teacher = torch.randn(8, sum(HEADS.values())) * 3
    temperatures, weights = [2.0, 4.0, 1.5], [1.0, 0.5, 2.0]

    packed = student(images)
    fused = rcfast.multihead_kd_loss(packed, teacher, splits=student.splits, temperature=temperatures,
                                     weights=weights)
    fused.backward()
    fused_grad = student.heads.weight.grad.clone()

    # The same heads as separate nn.Linear layers, each with its own loss.
    student.zero_grad()
    feats = student.features(images)
    total, start = 0.0, 0
    separate = []
    for (name, size), tau, w in zip(HEADS.items(), temperatures, weights):
        head = nn.Linear(student.feature_dim, size)
        with torch.no_grad():
            head.weight.copy_(student.heads.weight[start:start + size])
            head.bias.copy_(student.heads.bias[start:start + size])
        separate.append(head)
        total = total + rcfast.multihead_kd_loss(head(feats), teacher[:, start:start + size],
                                                 temperature=tau, weights=[w])
        start += size
    total.backward()
    torch.testing.assert_close(fused, total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad, torch.cat([h.weight.grad for h in separate]), rtol=1e-4, atol=1e-6)


def test_student_rejects_bad_arguments():
    backbone = SmallCNN(width=4)
    with pytest.raises(ValueError, match="heads"):
        MultiHeadStudent(backbone, 16, {})
    with pytest.raises(ValueError, match=r"heads\['a'\]"):
        MultiHeadStudent(backbone, 16, {"a": 0})
    with pytest.raises(ValueError, match="feature_dim"):
        MultiHeadStudent(backbone, -1, {"a": 2})
    with pytest.raises(TypeError, match="backbone"):
        MultiHeadStudent("resnet", 16, {"a": 2})
    wrong = MultiHeadStudent(backbone, 32, {"a": 2})
    with pytest.raises(ValueError, match="feature_dim=32"):
        wrong(torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_small_cnn_features(norm):
    net = SmallCNN(width=8, norm=norm)
    assert net.feature_dim == 32
    assert net(torch.randn(3, 3, 32, 32)).shape == (3, 32)


@pytest.mark.slow
def test_resnet18_backbone_shape_and_depth():
    net = resnet18_backbone(num_channels=1, width=8)
    assert isinstance(net, ResNetBackbone) and net.feature_dim == 64
    blocks = [m for m in net.modules() if type(m).__name__ == "_BasicBlock"]
    assert len(blocks) == 8  # ResNet-18: 4 stages x 2 basic blocks (+ stem + fc = 18 layers)
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 64)
    imagenet = resnet18_backbone(width=64, stem="imagenet")
    assert imagenet(torch.randn(1, 3, 64, 64)).shape == (1, 512)
    # torchvision's resnet18 has 11,689,512 parameters, 513,000 of them in its fc.
    assert sum(p.numel() for p in imagenet.parameters()) == 11_689_512 - 513_000


def test_registry_builds_by_name_and_rejects_unknown_names():
    assert {"small_cnn", "resnet18"} <= set(available_models())
    assert build_model("resnet18", width=4).feature_dim == 32
    with pytest.raises(ValueError, match="unknown model 'vgg99'.*small_cnn"):
        build_model("vgg99")
    with pytest.raises(ValueError, match="small_cnn.*rejected its arguments"):
        build_model("small_cnn", depth=3)

    @register_model("tiny_mlp_for_test")
    def tiny(feature_dim: int = 6):
        net = nn.Sequential(nn.Flatten(), nn.LazyLinear(feature_dim))
        net.feature_dim = feature_dim
        return net

    student = build_student("tiny_mlp_for_test", {"x": 2})
    assert student(torch.randn(2, 3, 4, 4)).shape == (2, 2)
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny_mlp_for_test", lambda: None)


def test_classifier_and_its_backbone():
    clf = build_classifier("small_cnn", 7, width=4)
    assert clf(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    assert classifier_backbone(clf) is clf.backbone
    with pytest.raises(ValueError, match="num_classes"):
        build_classifier("small_cnn", 0)


def test_torchvision_prefix_builds_backbones_and_classifiers(monkeypatch):
    fake_torchvision(monkeypatch)
    backbone = build_model("torchvision:resnet_fake")
    assert backbone.feature_dim == 8 and isinstance(backbone.fc, nn.Identity)
    assert backbone(torch.randn(2, 3, 8, 8)).shape == (2, 8)
    student = build_student("torchvision:resnet_fake", {"a": 3, "b": 4})
    assert student(torch.randn(2, 3, 8, 8)).shape == (2, 7)
    clf = build_classifier("torchvision:resnet_fake", 5)
    assert clf(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    features = classifier_backbone(clf)
    assert features(torch.randn(2, 3, 8, 8)).shape == (2, 8)
    assert isinstance(clf.fc, nn.Linear)  # the original keeps its classifier


def test_torchvision_prefix_without_torchvision_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` raise ImportError
    with pytest.raises(ImportError, match="optional package 'torchvision'"):
        build_model("torchvision:resnet18")
    with pytest.raises(ImportError, match="optional package 'torchvision'"):
        build_classifier("torchvision:resnet18", 10)
