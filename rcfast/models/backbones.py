"""Built-in backbones: a small CNN for 32x32 CPU images and a ResNet-18.

Every backbone maps ``[B, C, H, W]`` images to features ``[B, feature_dim]`` and
exposes ``feature_dim`` so a :class:`~rcfast.models.MultiHeadStudent` can be put
on top without knowing the architecture.
"""
from __future__ import annotations

from torch import nn

__all__ = ["SmallCNN", "ResNetBackbone", "small_cnn", "resnet18_backbone"]

NORMS = ("batch", "group", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # GroupNorm is per-sample: results do not depend on the batch split, so a
        # DDP run computes exactly what one process on the global batch would.
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class SmallCNN(nn.Module):
    """A 4-conv CNN sized for 32x32 images on a CPU.

    One 3x3 conv at full resolution (where activations are largest), one at
    1/2, two at 1/4, each followed by a norm and ReLU, 2x2 max-pools between
    resolutions, then global average pooling: ``feature_dim = 4 * width``.
    """

    def __init__(self, num_channels: int = 3, width: int = 32, norm: str = "batch") -> None:
        super().__init__()
        if num_channels <= 0 or width <= 0:
            raise ValueError(f"num_channels and width must be positive, got {num_channels} and {width}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")

        def block(in_ch: int, out_ch: int) -> list[nn.Module]:
            return [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=norm == "none"),
                    _norm(norm, out_ch), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(num_channels, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
            *block(4 * width, 4 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 4 * width

    def forward(self, images):
        return self.pool(self.body(images)).flatten(1)


class _BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = _norm(norm, out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                          _norm(norm, out_ch))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetBackbone(nn.Module):
    """ResNet with basic blocks (ResNet-18 for ``blocks=(2, 2, 2, 2)``), no classifier.

    ``stem="cifar"`` (3x3 conv, stride 1, no max-pool) suits 32x32 images;
    ``stem="imagenet"`` is the usual 7x7/2 conv + 3x3/2 max-pool for 224x224.
    ``feature_dim = 8 * width``.
    """

    def __init__(self, num_channels: int = 3, width: int = 64, blocks=(2, 2, 2, 2),
                 stem: str = "cifar", norm: str = "batch") -> None:
        super().__init__()
        if num_channels <= 0 or width <= 0:
            raise ValueError(f"num_channels and width must be positive, got {num_channels} and {width}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(num_channels, width, 3, padding=1, bias=False),
                                      _norm(norm, width), nn.ReLU(inplace=True))
        elif stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(num_channels, width, 7, stride=2, padding=3, bias=False),
                                      _norm(norm, width), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        stages, in_ch = [], width
        for i, n in enumerate(blocks):
            out_ch = width * 2 ** i
            for j in range(n):
                stages.append(_BasicBlock(in_ch, out_ch, 2 if (i > 0 and j == 0) else 1, norm))
                in_ch = out_ch
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images):
        return self.pool(self.layers(self.stem(images))).flatten(1)


def small_cnn(num_channels: int = 3, width: int = 32, norm: str = "batch") -> SmallCNN:
    """The small built-in CNN (registry name ``"small_cnn"``)."""
    return SmallCNN(num_channels=num_channels, width=width, norm=norm)


def resnet18_backbone(num_channels: int = 3, width: int = 64, stem: str = "cifar",
                      norm: str = "batch") -> ResNetBackbone:
    """A ResNet-18 backbone (registry name ``"resnet18"``); ``feature_dim = 8 * width``."""
    return ResNetBackbone(num_channels=num_channels, width=width, blocks=(2, 2, 2, 2), stem=stem, norm=norm)
