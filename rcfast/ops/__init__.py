"""Op front-ends: the fused multi-head KD loss (dense and top-k teacher), its backends and its references;
Sinkhorn OT."""
from rcfast.ops.backends import available_backends
from rcfast.ops.multihead_kd import multihead_kd_loss
from rcfast.ops.sinkhorn import sinkhorn
from rcfast.ops.sparse_kd import sparse_multihead_kd_loss

__all__ = ["available_backends", "multihead_kd_loss", "sinkhorn", "sparse_multihead_kd_loss"]
