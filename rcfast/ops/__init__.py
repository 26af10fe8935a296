"""Op front-ends: the fused multi-head KD loss (dense, top-k teacher, fused with the last linear layer),
its backends and its references;
Sinkhorn OT."""
from rcfast.ops.backends import available_backends
from rcfast.ops.fused_linear_kd import fused_linear_multihead_kd_loss
from rcfast.ops.multihead_kd import multihead_kd_loss
from rcfast.ops.sinkhorn import sinkhorn
from rcfast.ops.sparse_kd import sparse_multihead_kd_loss

__all__ = ["available_backends", "fused_linear_multihead_kd_loss", "multihead_kd_loss", "sinkhorn",
           "sparse_multihead_kd_loss"]
