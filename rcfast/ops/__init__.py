"""Op front-ends: the fused multi-head KD loss, its backends and its reference; Sinkhorn OT."""
from rcfast.ops.backends import available_backends
from rcfast.ops.multihead_kd import multihead_kd_loss
from rcfast.ops.sinkhorn import sinkhorn

__all__ = ["available_backends", "multihead_kd_loss", "sinkhorn"]
