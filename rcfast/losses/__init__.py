"""Distillation losses as ``nn.Module``s."""
from rcfast.losses.kd import MultiHeadKDLoss

__all__ = ["MultiHeadKDLoss"]
