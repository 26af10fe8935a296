"""Process-group set-up under ``torchrun`` and the few collectives the trainer needs.

``torchrun`` exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`setup_distributed` initialises the default group from
them (``env://``) with NCCL on GPUs and gloo on CPUs. Without those variables
(or with ``WORLD_SIZE=1``) everything runs as a single process.

Collectives wait at most ``timeout_s`` (``train.dist_timeout_s``) for the other
ranks: a rank that stops or hangs makes the others fail with
:class:`~rcfast.train.errors.DistributedError` instead of waiting forever (with
gloo the error is raised; NCCL's watchdog aborts the process after logging it).
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "setup_distributed", "resolve_device", "is_collective_failure", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 600.0
# Phrases of the transports' errors (gloo raises plain RuntimeErrors) that mean a peer is gone or late.
_COLLECTIVE_FAILURES = ("gloo", "nccl", "timed out", "connection reset", "connection closed", "broken pipe",
                        "socket", "peer")


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> this rank's GPU if there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"train.device: {device!r} is not a torch device ({exc})") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={device!r} but no CUDA device is available")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank)
    return resolved


@dataclass
class DistContext:
    """Rank, world size and device of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main rank writes checkpoints, metrics and progress bars."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj`` (a list of one on a single process)."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def max(self, value: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum of a tensor over ranks (itself on a single process)."""
        if not self.distributed:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a tensor over ranks (itself on a single process)."""
        if not self.distributed:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def shutdown(self) -> None:
        """Destroy the process group if this context created it."""
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()
            self.initialized_here = False


def is_collective_failure(exc: BaseException) -> bool:
    """Does ``exc`` say a collective failed because a peer stopped, hung or dropped the connection?"""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(phrase in text for phrase in _COLLECTIVE_FAILURES)


def setup_distributed(device: str = "auto", backend: str = "auto",
                      timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the ``torchrun`` process group if there is one; pick this rank's device.

    ``backend="auto"`` is ``nccl`` on CUDA devices and ``gloo`` otherwise.
    ``timeout_s``: how long a collective waits for the other ranks. A group
    initialised earlier by the caller is reused as is (with its own timeout).
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not (
            math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"train.dist_timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        return DistContext(rank, world_size, local_rank, resolve_device(device, local_rank), False)
    if world_size <= 1:
        return DistContext(0, 1, 0, resolve_device(device, 0), False)
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world_size} but this torch build has no torch.distributed")
    resolved = resolve_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if resolved.type == "cuda" else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"train.dist_backend must be 'auto', 'nccl' or 'gloo', got {backend!r}")
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    dist.init_process_group(backend=backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, resolved, True)
