"""Errors a training run reports to its user (the ``rcfast`` command prints them as one line).

- :class:`CheckpointError`: a checkpoint file that cannot be used -- missing,
  empty, truncated, not a torch file, carrying code, or failing its content hash.
- :class:`DivergenceError`: the run produced non-finite values; nothing with
  them was written and the last good checkpoint is kept.
- :class:`DistributedError`: a collective did not complete (a rank stopped, or
  did not answer within ``train.dist_timeout_s``).

Configuration mistakes are :class:`rcfast.train.config.ConfigError`.
"""
from __future__ import annotations

__all__ = ["TrainingError", "CheckpointError", "DivergenceError", "DistributedError"]


class TrainingError(RuntimeError):
    """A run stopped for a reason its user must act on."""


class CheckpointError(ValueError):
    """A checkpoint file is unusable (the message names the file and why)."""


class DivergenceError(TrainingError, FloatingPointError):
    """Training produced non-finite values; no checkpoint or model with them was written."""


class DistributedError(TrainingError):
    """A collective operation failed or timed out (another rank stopped or hangs)."""
