"""The ``cpu`` (and, when built with CUDA, ``cuda``) backend: ``rcfast._C``.

Importing ``rcfast._C`` runs its static ``TORCH_LIBRARY`` registrations; this
module then adds the fake implementation and autograd formula (see
:mod:`rcfast.ops.kernel_contract`), so the op works under ``torch.compile``.
"""
from __future__ import annotations

import torch

from rcfast import _C  # noqa: F401  (registers the rcfast:: ops)
from rcfast.ops.kernel_contract import register_kernel_op_meta

__all__ = ["multihead_kd_fwd", "built_with_cuda", "cpu_capability"]

register_kernel_op_meta("rcfast::multihead_kd_fwd")

multihead_kd_fwd = torch.ops.rcfast.multihead_kd_fwd.default


def built_with_cuda() -> bool:
    """Whether ``rcfast._C`` holds the CUDA kernel as well as the CPU one."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("rcfast::multihead_kd_fwd", "CUDA")


def cpu_capability() -> str:
    """The vector instruction set the CPU kernel dispatches to on this machine
    (``"avx512"``, ``"avx2"`` or ``"default"``; ``ATEN_CPU_CAPABILITY`` can lower it)."""
    return torch.ops.rcfast.kd_cpu_capability()
