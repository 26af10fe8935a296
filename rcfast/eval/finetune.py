"""Short fine-tune: a copy of the backbone plus a new linear head, trained end to end."""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["finetune_accuracy"]


def _feature_dim(backbone: nn.Module, images: torch.Tensor) -> int:
    dim = getattr(backbone, "feature_dim", None)
    if isinstance(dim, int):
        return dim
    was_training = backbone.training
    backbone.eval()
    with torch.inference_mode():
        dim = backbone(images[:1]).flatten(1).shape[1]
    backbone.train(was_training)
    return dim


def finetune_accuracy(backbone: nn.Module, train_data, test_data, num_classes: int, epochs: int = 3,
                      lr: float = 1e-3, weight_decay: float = 1e-4, device: torch.device | str = "cpu",
                      precision: str = "fp32", seed: int = 0) -> float:
    """Fine-tune a copy of ``backbone`` with a fresh linear head; return test accuracy.

    ``train_data``/``test_data`` yield ``(images, labels)`` batches and are
    iterated once per epoch. The caller's backbone, and its global RNG state,
    are left untouched (the new head is initialised from ``seed``).
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    device = torch.device(device)
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16"
                else contextlib.nullcontext)
    # A private RNG stream: the caller's torch RNG is restored when this returns.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return _finetune(backbone, train_data, test_data, num_classes, epochs, lr, weight_decay, device, autocast)


def _finetune(backbone, train_data, test_data, num_classes, epochs, lr, weight_decay, device, autocast) -> float:
    net = copy.deepcopy(backbone).to(device)
    # The head, optimiser and schedule are built at the first batch, where the
    # feature width can be measured: peeking at a batch beforehand would move a
    # stateful dataset's position.
    model = optimizer = scheduler = None
    steps_per_epoch = len(train_data) if hasattr(train_data, "__len__") else None
    for _ in range(epochs):
        for images, labels in train_data:
            images = images.to(device, non_blocking=True)
            if model is None:
                model = nn.Sequential(net, nn.Flatten(1), nn.Linear(_feature_dim(net, images), num_classes)).to(device)
                optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
                if steps_per_epoch:
                    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
            model.train()
            with autocast():
                logits = model(images)
            loss = F.cross_entropy(logits.float(), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
    if model is None:
        raise ValueError("train_data yielded no batches")
    model.eval()
    correct = total = 0
    with torch.inference_mode(), autocast():
        for images, labels in test_data:
            pred = model(images.to(device, non_blocking=True)).argmax(dim=1)
            correct += int((pred.cpu() == labels.cpu()).sum())
            total += labels.shape[0]
    if total == 0:
        raise ValueError("test_data yielded no samples")
    return correct / total
