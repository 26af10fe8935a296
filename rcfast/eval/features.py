"""Feature extraction from a frozen backbone over a labeled dataset."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

__all__ = ["extract_features"]


def extract_features(backbone: nn.Module, data, device: torch.device | str | None = None,
                     precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """Run ``backbone`` in ``eval()`` mode over ``data``; return ``(features, labels)``.

    Args:
        backbone: maps images to ``[B, D]`` (or anything flattened to that).
        data: iterable of ``(images, labels)`` batches, e.g. ``ProxyImages(labels=True)``.
        device: where to run (default: the backbone's parameters' device).
        precision: ``"fp32"`` or ``"bf16"`` (autocast); features come back float32.

    Returns:
        ``features`` float32 ``[N, D]`` and ``labels`` int64 ``[N]`` as NumPy arrays.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if device is None:
        param = next(backbone.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    try:
        with torch.inference_mode(), autocast:
            for batch in data:
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise ValueError("data must yield (images, labels) batches (use labels=True)")
                images, targets = batch
                out = backbone(images.to(device, non_blocking=True))
                feats.append(out.flatten(1).float().cpu())
                labels.append(targets.cpu())
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("data yielded no batches")
    return torch.cat(feats).numpy(), torch.cat(labels).to(torch.int64).numpy()
