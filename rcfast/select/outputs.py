"""One pass of a classifier over a labeled sample: its features, logits and classifier.

A teacher's *features* are the input of its last ``nn.Linear`` -- the layer
:func:`rcfast.models.classifier_backbone` strips to make a backbone -- and its
*logits* are its output. Both come from a single forward pass per batch (a
forward hook reads the linear layer's input), in ``eval()`` mode under
``torch.inference_mode``, so scoring a teacher costs one pass over the sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

__all__ = ["ClassifierOutputs", "final_linear", "classifier_outputs", "labeled_batches", "check_labels"]


@dataclass
class ClassifierOutputs:
    """What one pass of a classifier over a labeled sample gives (all float32/int64, on the CPU).

    Attributes:
        features: ``[N, D]`` inputs of the last ``nn.Linear``.
        logits: ``[N, C]`` outputs of the classifier.
        labels: ``[N]`` target labels of the sample.
        weight: ``[C, D]`` the last ``nn.Linear``'s weight (its rows are class directions).
    """

    features: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    weight: torch.Tensor


def final_linear(model: nn.Module, name: str = "model") -> nn.Linear:
    """The classifier layer of ``model``: its last module, which must be an ``nn.Linear``.

    Raises ``TypeError`` for a non-module and ``ValueError`` naming ``name`` when the
    last leaf module (in registration order) is something else.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be an nn.Module classifier, got {type(model).__name__}")
    leaves = [module for module in model.modules() if next(module.children(), None) is None]
    last = leaves[-1] if leaves else None
    if not isinstance(last, nn.Linear):
        kind = type(last).__name__ if last is not None else "nothing"
        raise ValueError(f"{name}: its last module is {kind}, not an nn.Linear: the features are read as the input "
                         "of the classifier's final nn.Linear (wrap post-processing such as softmax outside it)")
    return last


def check_labels(labels: torch.Tensor, num_classes: int | None, name: str = "labels") -> int:
    """Validate integer labels ``[N]`` against ``[0, num_classes)`` with no empty class; return the count."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(labels.shape)}")
    low, high = int(labels.min()), int(labels.max())
    if num_classes is None:
        num_classes = high + 1
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"{name} must lie in [0, {num_classes}), found {bad}")
    counts = torch.bincount(labels.to(torch.int64).cpu(), minlength=num_classes)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{name}: class{'es' if len(empty) > 1 else ''} {empty[:10]} of {num_classes} "
                         f"{'have' if len(empty) > 1 else 'has'} no sample (every target class needs at least one)")
    return num_classes


def labeled_batches(images, labels=None, batch_size: int = 256) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` batches from tensors ``[N, ...]`` + ``[N]``, or from an iterable of such
    batches (e.g. ``ProxyImages(..., labels=True)``) when ``labels`` is ``None``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(images, torch.Tensor):
        if labels is None:
            raise ValueError("labels: images given as a tensor need a labels tensor")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if images.dim() < 2 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"images [N, ...] and labels [N] must have one label per image, got shapes "
                             f"{tuple(images.shape)} and {tuple(labels.shape)}")
        return [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    if labels is not None:
        raise ValueError("labels: pass labels only with an images tensor; an iterable data source yields "
                         "(images, labels) batches itself")
    if not hasattr(images, "__iter__"):
        raise TypeError(f"images must be a tensor or an iterable of (images, labels) batches, got "
                        f"{type(images).__name__}")
    return images


def _device_of(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def classifier_outputs(model: nn.Module, images, labels=None, *, batch_size: int = 256, device=None,
                       name: str = "model") -> ClassifierOutputs:
    """Run ``model`` once over a labeled sample; return its features, logits, labels and classifier weight.

    Args:
        model: a classifier whose last module is an ``nn.Linear``.
        images, labels: tensors ``[N, ...]`` and ``[N]``, or an iterable of
            ``(images, labels)`` batches with ``labels=None``.
        batch_size: rows per forward pass for tensor inputs.
        device: where to run (default: the model's parameters' device).
        name: how error messages call the model.

    The model runs in ``eval()`` under ``torch.inference_mode``; its training
    mode is restored afterwards.
    """
    linear = final_linear(model, name)
    device = _device_of(model, device)
    captured: list[torch.Tensor] = []

    def hook(_module, inputs, _output):
        captured.append(inputs[0])

    features, logits, targets = [], [], []
    was_training = model.training
    handle = linear.register_forward_hook(hook)
    model.eval()
    try:
        with torch.inference_mode():
            for batch in labeled_batches(images, labels, batch_size):
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise ValueError("images: the data must yield (images, labels) batches (ProxyImages(labels=True))")
                x, y = batch
                captured.clear()
                out = model(x.to(device))
                if len(captured) != 1:
                    raise ValueError(f"{name}: its final nn.Linear ran {len(captured)} times in one forward pass "
                                     "(expected once: it must be the classifier that produces the output)")
                expected = (x.shape[0], linear.out_features)
                if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape != expected:
                    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ValueError(f"{name}: expected logits [{x.shape[0]}, {linear.out_features}] from the "
                                     f"final nn.Linear, got {shape}")
                features.append(captured[0].flatten(1).float().cpu())
                logits.append(out.float().cpu())
                targets.append(torch.as_tensor(y).cpu())
    finally:
        handle.remove()
        model.train(was_training)
    if not features:
        raise ValueError("images: the data yielded no batches")
    return ClassifierOutputs(features=torch.cat(features), logits=torch.cat(logits), labels=torch.cat(targets),
                             weight=linear.weight.detach().float().cpu())
