"""Run-wide process settings, in one explicit place: threads, determinism, cuBLAS workspace, seeds.

These change the whole process, so library code never sets them. The program
that owns the process -- the ``rcfast`` command, a script, a notebook -- calls
:func:`apply_runtime` once, before any model touches a device::

    config = load_config("run.yaml")
    apply_runtime(config.train)          # what `rcfast consolidate` does first
    trainer = Consolidator.from_config(config)

The trainer only checks (:func:`check_runtime`) that the process matches what
its config asks for, and raises naming the fix when it does not, instead of
silently running non-deterministically or on another number of threads.
:func:`process_state` snapshots everything this module (or a misbehaving
library) could change, for tests.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from rcfast.train.checkpoint import capture_rng_state, seed_everything

__all__ = ["RuntimeSettings", "apply_runtime", "check_runtime", "process_state", "CUBLAS_WORKSPACE"]

CUBLAS_WORKSPACE = ":4096:8"
"""cuBLAS is deterministic only with a fixed workspace, set before its first use."""


@dataclass(frozen=True)
class RuntimeSettings:
    """The process settings a run asks for (``train.num_threads``, ``train.deterministic``, ``train.seed``)."""

    num_threads: int | None = None
    deterministic: bool = False
    seed: int | None = None

    @classmethod
    def of(cls, train) -> "RuntimeSettings":
        """From a :class:`~rcfast.train.TrainConfig` (or anything with those attributes)."""
        return cls(num_threads=train.num_threads, deterministic=bool(train.deterministic), seed=train.seed)


def _settings(settings) -> RuntimeSettings:
    return settings if isinstance(settings, RuntimeSettings) else RuntimeSettings.of(settings)


def apply_runtime(settings) -> RuntimeSettings:
    """Apply ``settings`` (a :class:`RuntimeSettings` or a ``TrainConfig``) to this process.

    - ``num_threads``: ``torch.set_num_threads``;
    - ``deterministic``: ``CUBLAS_WORKSPACE_CONFIG`` (unless already set),
      ``torch.use_deterministic_algorithms(True)``, ``cudnn.benchmark = False``;
    - ``seed``: seeds Python's ``random``, NumPy's and torch's global RNGs (the
      trainer seeds its own run again; this covers everything else).
    """
    settings = _settings(settings)
    if settings.num_threads is not None:
        if settings.num_threads <= 0:
            raise ValueError(f"train.num_threads must be > 0, got {settings.num_threads}")
        torch.set_num_threads(settings.num_threads)
    if settings.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if settings.seed is not None:
        seed_everything(settings.seed)
    return settings


def check_runtime(settings, device: torch.device) -> None:
    """Raise ``ValueError`` if this process does not run as ``settings`` ask (nothing is changed)."""
    settings = _settings(settings)
    fix = ("apply it with rcfast.train.runtime.apply_runtime(config.train) before building models "
           "(the rcfast command does this)")
    if settings.num_threads is not None and torch.get_num_threads() != settings.num_threads:
        raise ValueError(f"train.num_threads is {settings.num_threads} but this process runs "
                         f"{torch.get_num_threads()} torch threads: {fix}")
    if settings.deterministic:
        if not torch.are_deterministic_algorithms_enabled():
            raise ValueError(f"train.deterministic is true but torch's deterministic algorithms are off: {fix}")
        if device.type == "cuda":
            if torch.backends.cudnn.benchmark:
                raise ValueError(f"train.deterministic is true but cudnn.benchmark is on: {fix}")
            if not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
                raise ValueError(f"train.deterministic is true on CUDA but CUBLAS_WORKSPACE_CONFIG is unset: {fix}")


def process_state() -> dict:
    """A snapshot of the process-wide state runs could touch (compare two snapshots with ``==``)."""
    rng = capture_rng_state()
    return {
        "num_threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "env": {k: os.environ.get(k) for k in ("CUBLAS_WORKSPACE_CONFIG", "OMP_NUM_THREADS")},
        "default_dtype": torch.get_default_dtype(),
        "grad_enabled": torch.is_grad_enabled(),
        "rng_torch": rng["torch"].tolist(),
        "rng_numpy": rng["numpy"]["keys"].tolist() + [rng["numpy"]["pos"]],
        "rng_python": list(rng["python"]["internal"]),
        "rng_cuda": [s.tolist() for s in rng.get("cuda", [])],
    }
