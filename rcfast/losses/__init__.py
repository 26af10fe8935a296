"""Distillation losses as ``nn.Module``s."""
from rcfast.losses.kd import MultiHeadKDLoss
from rcfast.losses.ot import OTDistillLoss, ot_distill_loss

__all__ = ["MultiHeadKDLoss", "OTDistillLoss", "ot_distill_loss"]
