"""Distillation losses as ``nn.Module``s (and their functional forms)."""
from rcfast.losses.dmc import DoubleDistillLoss, double_distill_loss
from rcfast.losses.iekd import IEKDLoss, exploration_loss, inheritance_loss
from rcfast.losses.kd import MultiHeadKDLoss

__all__ = ["MultiHeadKDLoss", "IEKDLoss", "inheritance_loss", "exploration_loss", "DoubleDistillLoss",
           "double_distill_loss"]
