"""Option helpers shared by the IE-KD, mutual-learning and DMC terms: default head/teacher, weight warm-up."""
from __future__ import annotations

import math

from rcfast.train.objectives.base import TermSetup

__all__ = ["only_head", "only_teacher", "check_warmup_steps", "warmup_factor", "nonnegative"]


def _only(setup: TermSetup, kind: str, names: dict, chosen: str | None, check) -> str:
    if chosen is not None:
        return check(chosen)
    if len(names) != 1:
        raise setup.error(f"{kind}: the run has {len(names)} {kind}s {list(names)}; "
                          "say which one this term uses")
    return next(iter(names))


def only_head(setup: TermSetup, head: str | None) -> str:
    """``head`` checked against the student, or the student's single head when ``head`` is None."""
    return _only(setup, "head", setup.heads, head, setup.head)


def only_teacher(setup: TermSetup, teacher: str | None) -> str:
    """``teacher`` checked against the run, or the run's single teacher when ``teacher`` is None."""
    return _only(setup, "teacher", setup.teachers, teacher, setup.teacher)


def nonnegative(option: str, value) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``option`` unless it is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{option} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_warmup_steps(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {value!r}")
    return value


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up of a weight: ``(step + 1) / warmup_steps`` for the first steps, then 1.

    ``step`` is the 0-based index of the optimiser step being computed, so the
    first step already has a small non-zero weight and step ``warmup_steps - 1``
    has the full weight. A function of the step alone: a resumed run continues
    the same ramp.
    """
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps
