"""Optimisers (fused where the device supports it) and the warm-up + cosine schedule.

Implementation choice, ``optim.impl``:

- ``"apex"``: apex's ``FusedAdam``/``FusedLAMB`` (CUDA only, needs apex).
- ``"torch"``: torch's optimiser with ``fused=True`` when torch has a fused
  kernel for the device, else ``foreach=True`` (with a one-time warning).
- ``"auto"``: apex on CUDA when apex is importable, else ``"torch"``. LAMB has
  no torch implementation, so ``name: lamb`` needs apex.

Weight decay is not applied to biases and normalisation parameters (1-D
tensors), the usual practice for vision backbones.
"""
from __future__ import annotations

import functools
import importlib
import math
import warnings

import torch
from torch import nn

from rcfast.train.config import OptimConfig

__all__ = ["build_optimizer", "build_scheduler", "warmup_cosine"]

_TORCH_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _apex_optimizers():
    try:
        return importlib.import_module("apex.optimizers"), None
    except Exception as exc:  # ImportError, or apex built against another torch
        return None, f"{type(exc).__name__}: {exc}"


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _torch_optimizer(cfg: OptimConfig, groups, device: torch.device):
    cls = _TORCH_OPTIMIZERS[cfg.name]
    kwargs = {"lr": cfg.lr}
    if cfg.name == "sgd":
        kwargs.update(momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    else:
        kwargs.update(betas=tuple(cfg.betas))
    try:
        return cls(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError) as exc:
        # torch raises when the device has no fused kernel for this optimiser.
        _warn_once(f"rcfast: torch.optim.{cls.__name__}(fused=True) is not supported on {device.type} "
                   f"({exc}); using foreach=True instead")
        return cls(groups, foreach=True, **kwargs)


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg`` for ``model``'s trainable parameters."""
    groups = _param_groups(model, cfg.weight_decay)
    impl = cfg.impl
    if impl == "auto":
        apex_ok = device.type == "cuda" and _apex_optimizers()[0] is not None
        impl = "apex" if apex_ok else "torch"
    if impl == "apex" or cfg.name == "lamb":
        if device.type != "cuda":
            raise ValueError(f"optim.name={cfg.name!r} with apex needs a CUDA device, got {device}; "
                             "use adamw/adam/sgd with impl 'torch' on CPU")
        apex_optim, reason = _apex_optimizers()
        if apex_optim is None:
            raise ImportError(f"optim.impl 'apex' (or name 'lamb') needs NVIDIA apex, which is not "
                              f"importable: {reason}")
        betas = tuple(cfg.betas)
        if cfg.name == "lamb":
            return apex_optim.FusedLAMB(groups, lr=cfg.lr, betas=betas)
        if cfg.name in ("adamw", "adam"):
            return apex_optim.FusedAdam(groups, lr=cfg.lr, betas=betas, adam_w_mode=cfg.name == "adamw")
        return apex_optim.FusedSGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return _torch_optimizer(cfg, groups, device)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear from ~0 to 1 over ``warmup_steps``, then cosine to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """A ``LambdaLR`` stepping once per optimiser step (warm-up, then cosine).

    The multiplier is a ``functools.partial`` of a module-level function, so the
    scheduler's ``state_dict`` holds numbers only (no pickled code) and loads
    with ``weights_only=True``.
    """
    schedule = functools.partial(warmup_cosine, warmup_steps=cfg.warmup_steps, total_steps=total_steps,
                                 min_ratio=cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
