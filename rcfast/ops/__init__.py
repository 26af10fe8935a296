"""Op front-ends: the fused multi-head KD loss, its backends and its reference."""
from rcfast.ops.backends import available_backends
from rcfast.ops.multihead_kd import multihead_kd_loss

__all__ = ["available_backends", "multihead_kd_loss"]
