"""rcfast: fast distillation of expert students (representation consolidation).

The fused loss is importable on its own::

    import rcfast
    loss = rcfast.multihead_kd_loss(student_logits, teacher_logits, splits=[1000, 100])

Sub-packages (``rcfast.data``, ``rcfast.models``, ``rcfast.train``, ``rcfast.eval``)
are imported on demand so that codebases using only the loss pay nothing for them.
"""
from rcfast.losses.kd import MultiHeadKDLoss
from rcfast.ops.backends import available_backends
from rcfast.ops.fused_linear_kd import fused_linear_multihead_kd_loss
from rcfast.ops.multihead_kd import multihead_kd_loss
from rcfast.ops.sparse_kd import sparse_multihead_kd_loss

__version__ = "0.1.0"

__all__ = ["MultiHeadKDLoss", "available_backends", "fused_linear_multihead_kd_loss", "multihead_kd_loss",
           "sparse_multihead_kd_loss", "__version__"]
