"""Op front-ends: the fused multi-head KD loss, its backends and its reference."""
from rcfast.ops.backends import available_backends
from rcfast.ops.fused_linear_kd import fused_linear_multihead_kd_loss
from rcfast.ops.multihead_kd import multihead_kd_loss

__all__ = ["available_backends", "fused_linear_multihead_kd_loss", "multihead_kd_loss"]
