"""Which loss backends exist on this machine, and which one a call runs on.

Backends:

- ``reference``: pure PyTorch (:mod:`rcfast.ops.reference`), always there.
- ``cpu``: the vectorised OpenMP kernel in ``rcfast._C``.
- ``triton``: the Triton kernel in ``rcfast.kernels`` (CUDA tensors; CPU tensors
  only under ``TRITON_INTERPRET=1``, which is how the tests run it).
- ``cuda``: the CUDA kernel in ``rcfast._C`` when it was built with CUDA.

``auto`` picks ``cpu`` for CPU tensors and ``triton`` (else ``cuda``, else
``reference``) for CUDA tensors. A fallback to ``reference`` is never silent: it
warns once, with the reason.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "kernel_op", "unavailable_reason"]

BACKENDS = ("reference", "cpu", "triton", "cuda")


@functools.lru_cache(maxsize=None)
def _try_import(module_name: str):
    """Import a backend module; return ``(module, None)`` or ``(None, reason)``."""
    try:
        return importlib.import_module(module_name), None
    except Exception as exc:  # an import error, or a broken/ABI-mismatched .so
        return None, f"{type(exc).__name__}: {exc}"


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _assume_constant_result(fn):
    """What ``torch.compiler.assume_constant_result`` does, without its cost.

    Under torch.compile, Dynamo must not trace the imports behind a backend's
    availability (it refuses importlib): a function so marked is called once at
    trace time and its result kept. The public decorator only sets this marker,
    but calling it imports torch._dynamo (2.3 s here), which a codebase that
    imports just the loss should not pay. tests/test_kd_loss.py checks that the
    public decorator still sets exactly this marker.
    """
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def unavailable_reason(backend: str) -> str | None:
    """``None`` if ``backend`` works here, else why not (for error messages)."""
    if backend == "reference":
        return None
    if backend == "cpu":
        return _try_import("rcfast.ops.cpu_backend")[1]
    if backend == "cuda":
        module, reason = _try_import("rcfast.ops.cpu_backend")
        if module is None:
            return reason
        if not module.built_with_cuda():
            return "rcfast._C was built without CUDA (no CUDA toolkit/torch when it was built)"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if backend == "triton":
        if not (torch.cuda.is_available() or _triton_interpreting()):
            return "Triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"
        return _try_import("rcfast.ops.triton_backend")[1]
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


def available_backends() -> list[str]:
    """The backends that work on this machine, e.g. ``['reference', 'cpu']``."""
    return [name for name in BACKENDS if unavailable_reason(name) is None]


@functools.lru_cache(maxsize=None)
def _warn_fallback_once(device_type: str, reason: str) -> None:
    warnings.warn(
        f"rcfast: no fused kernel for {device_type} tensors ({reason}); "
        "using the pure-PyTorch reference backend, which is slower.",
        RuntimeWarning,
        stacklevel=4,
    )


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``backend`` (possibly ``"auto"``) into a concrete, usable backend."""
    if backend == "auto":
        preferences = ("cpu",) if device.type == "cpu" else ("triton", "cuda")
        reasons = []
        for candidate in preferences:
            reason = unavailable_reason(candidate)
            if reason is None:
                return candidate
            reasons.append(f"{candidate}: {reason}")
        _warn_fallback_once(device.type, "; ".join(reasons))
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    reason = unavailable_reason(backend)
    if reason is not None:
        raise RuntimeError(f"rcfast: backend={backend!r} is not available here: {reason}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "triton" and device.type == "cpu" and not _triton_interpreting():
        raise ValueError(
            "backend='triton' runs on CPU tensors only under TRITON_INTERPRET=1 (for tests); "
            "use backend='cpu' or move the tensors to a GPU"
        )
    return backend


_KERNEL_OPS = {
    "cpu": ("rcfast.ops.cpu_backend", "multihead_kd_fwd"),
    "cuda": ("rcfast.ops.cpu_backend", "multihead_kd_fwd"),
    "triton": ("rcfast.ops.triton_backend", "multihead_kd_fwd_triton"),
}


def kernel_op(backend: str):
    """The ``torch.ops`` overload implementing a fused backend."""
    if backend not in _KERNEL_OPS:
        raise ValueError(f"no kernel op for backend {backend!r}")
    module_name, op_name = _KERNEL_OPS[backend]
    # Importing the backend module registers its op. Under torch.compile
    # resolve_backend has already imported it (at trace time), and Dynamo cannot
    # trace importlib: look the op up in torch.ops, which Dynamo understands.
    if not torch.compiler.is_compiling():
        module, reason = _try_import(module_name)
        if module is None:
            raise RuntimeError(f"rcfast: backend={backend!r} is not available here: {reason}")
    return getattr(torch.ops.rcfast, op_name).default
