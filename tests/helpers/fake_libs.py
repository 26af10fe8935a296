"""Stand-ins for the optional ``torchvision`` and ``timm`` packages (not installed here).

Each exposes the one entry point rcfast's registry calls, with a model whose
classifier sits where the real libraries put it (``fc`` for a torchvision
ResNet; timm's ``pretrained_cfg["classifier"]``), so ``torchvision:``/``timm:``
names can be tested without the libraries.
"""
from __future__ import annotations

import sys
import types

from torch import nn


class FakeResNet(nn.Module):
    """``conv -> pool -> fc``, the torchvision ResNet layout in miniature."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


class FakeTimmNet(nn.Module):
    """A timm-style model: ``head.fc`` classifier, ``Identity`` when ``num_classes=0``."""

    def __init__(self, num_classes: int = 1000, drop_rate: float = 0.0, **ignored):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Module()
        self.head.fc = nn.Linear(6, num_classes) if num_classes else nn.Identity()
        self.num_features = 6
        self.pretrained_cfg = {"classifier": "head.fc"}

    def forward(self, x):
        return self.head.fc(self.stem(x))


def fake_torchvision(monkeypatch) -> None:
    """Install a ``torchvision`` exposing ``models.get_model("resnet_fake", ...)``."""
    def get_model(name, **kwargs):
        if name != "resnet_fake":
            raise ValueError(f"Unknown model {name}")
        return FakeResNet(**kwargs)

    torchvision = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    models.get_model = get_model
    torchvision.models = models
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)


def fake_timm(monkeypatch, calls: list | None = None) -> None:
    """Install a ``timm`` exposing ``create_model("net_fake", num_classes=...)``.

    Every call's ``(name, kwargs)`` is appended to ``calls`` when given: what a
    real timm would do with ``checkpoint_path=`` or ``pretrained=True`` (open a
    file, download, unpickle) is what tests must show never reaches it.
    """
    def create_model(name, num_classes: int = 1000, **kwargs):
        if calls is not None:
            calls.append((name, dict(kwargs, num_classes=num_classes)))
        if name != "net_fake":
            raise RuntimeError(f"Unknown model ({name})")
        return FakeTimmNet(num_classes=num_classes, **kwargs)

    timm = types.ModuleType("timm")
    timm.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", timm)
