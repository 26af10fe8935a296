"""Triton kernels of rcfast, installed as the package ``rcfast.kernels``.

This package owns the GPU (and, under ``TRITON_INTERPRET=1``, CPU-interpreted)
kernels only: the ``@triton.jit`` functions, their launch heuristics and the
host code that allocates buffers and launches them. The ``torch.library`` op
that exposes them (``rcfast::multihead_kd_fwd_triton``) lives in
:mod:`rcfast.ops.triton_backend`; nothing here imports ``rcfast.ops`` (imports
go one way: ``ops -> kernels``).

Modules:

- :mod:`rcfast.kernels.kd_loss`: the fused multi-head softened-KL loss and its
  gradient over packed ``[B, N]`` logits (DESIGN.md, "The kernel algorithm").
"""
