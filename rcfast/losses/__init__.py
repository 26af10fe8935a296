"""Distillation losses as ``nn.Module``s (and their functional forms).

IE-KD and DMC are imported on first use (PEP 562 ``__getattr__``): IE-KD needs
``rcfast.models``, and ``import rcfast`` stays the fused loss alone.
"""
import importlib

from rcfast.losses.kd import MultiHeadKDLoss
from rcfast.losses.ot import OTDistillLoss, ot_distill_loss

__all__ = ["MultiHeadKDLoss", "OTDistillLoss", "ot_distill_loss", "IEKDLoss", "inheritance_loss", "exploration_loss", "DoubleDistillLoss",
           "double_distill_loss"]

_LAZY = {"IEKDLoss": "rcfast.losses.iekd", "inheritance_loss": "rcfast.losses.iekd",
         "exploration_loss": "rcfast.losses.iekd", "DoubleDistillLoss": "rcfast.losses.dmc",
         "double_distill_loss": "rcfast.losses.dmc"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
