"""The ``cpu`` (and, when built with CUDA, ``cuda``) backend of the sparse op: ``rcfast._C``.

Importing ``rcfast._C`` registers ``rcfast::sparse_multihead_kd_fwd`` (schema in
csrc/bindings.cpp, kernels in csrc/cpu/sparse_kd_cpu*.{cpp,h} and
csrc/cuda/sparse_kd_cuda*); this module adds its fake implementation and
autograd formula (:mod:`rcfast.ops.sparse_contract`). An ``rcfast._C`` built
before the sparse op existed fails this import with a message saying so.
"""
from __future__ import annotations

import torch

from rcfast import _C  # noqa: F401  (registers the rcfast:: ops)
from rcfast.ops.sparse_contract import register_sparse_op_meta

__all__ = ["sparse_multihead_kd_fwd", "sparse_built_with_cuda"]

QUALNAME = "rcfast::sparse_multihead_kd_fwd"

if not hasattr(torch.ops.rcfast, "sparse_multihead_kd_fwd"):
    raise ImportError("rcfast._C has no sparse_multihead_kd_fwd op: it was built before the op existed; "
                      "rebuild it with `bash scripts/setup_env.sh`")

register_sparse_op_meta(QUALNAME)

sparse_multihead_kd_fwd = torch.ops.rcfast.sparse_multihead_kd_fwd.default


def sparse_built_with_cuda() -> bool:
    """Whether ``rcfast._C`` holds the CUDA kernel of the sparse op."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(QUALNAME, "CUDA")
