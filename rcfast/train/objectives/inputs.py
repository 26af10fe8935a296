"""The inputs an objective term can ask a training step for, and the step's values of them.

A term declares each input it needs once, at bind time, as one of the keys
below (``setup.need(StudentLogits("proxy", ("task_a",)))``), and reads it in
``forward`` with ``step[key]``. The trainer computes every declared input once
per step, however many terms ask for it:

- the images of each *stream* (``"proxy"``, or a labeled task's name) are drawn
  once; the student runs once over the images of every stream that needs it
  (one forward over their concatenation), with forward hooks on the declared
  layers; each teacher runs once per stream that needs it;
- keys that select heads, teachers or rows are views (or, when the selection is
  not contiguous, one concatenation) of those single results.

Reading a key that was not declared is an error, so a term cannot depend on an
input the up-front checks did not cover.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

__all__ = ["InputKey", "Images", "Labels", "StudentLogits", "StudentLayer", "StudentHeadLinear", "TeacherLogits",
           "TeacherLayer", "StepInputs", "STUDENT_FEATURES"]

STUDENT_FEATURES = "backbone"
"""The layer name of the student's backbone output (``[B, feature_dim]``): ``StudentLayer(stream, "backbone")``."""


@dataclass(frozen=True)
class InputKey:
    """Base class of the inputs; every key names the data stream it is computed on."""

    stream: str

    def describe(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


@dataclass(frozen=True)
class Images(InputKey):
    """The step's images of ``stream``, on the training device: ``[B, C, H, W]``."""


@dataclass(frozen=True)
class Labels(InputKey):
    """The step's class labels of ``stream`` (int64 ``[B]``); the stream must yield labels."""


@dataclass(frozen=True)
class StudentLogits(InputKey):
    """The student's logits of ``heads`` (packed side by side in this order) on ``stream``'s rows.

    ``[B, sum(C_h)]``, with gradient, in the autocast dtype. All heads in the
    student's order is the student's packed output itself.
    """

    heads: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple(self.heads))


@dataclass(frozen=True)
class StudentLayer(InputKey):
    """The output of the student's submodule ``layer`` (a ``named_modules()`` name) on ``stream``'s rows.

    Captured by a forward hook during the step's single student forward, so it
    carries gradient. ``layer="backbone"`` is the feature vector the heads read.
    """

    layer: str


@dataclass(frozen=True)
class StudentHeadLinear(InputKey):
    """The rows of ``heads`` (in this order) of the student's packed head layer: ``(weight, bias)``.

    ``weight [sum(C_h), feature_dim]`` and ``bias [sum(C_h)]`` (or ``None``) are
    the student's parameters themselves (a view, or one concatenation when the
    heads are not side by side), so gradients reach them. A term declaring this
    applies the heads itself to ``StudentLayer(stream, "backbone")`` (e.g. with
    :func:`rcfast.fused_linear_multihead_kd_loss`); when no term of the run
    reads the student's logits, the student's forward then stops at the
    backbone (``student(x, with_heads=False)``) and no logits are made.
    """

    heads: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple(self.heads))


@dataclass(frozen=True)
class TeacherLogits(InputKey):
    """The logits of ``teachers`` (packed side by side in this order) on ``stream``: ``[B, sum(C_t)]``.

    Constants (no gradient), from the run's teacher source (models run under
    ``inference_mode``, or a cache). ``accepts_top_k``: the term also takes the
    teachers as their top-k logits (a
    :class:`~rcfast.train.sparse_teacher.SparseTeacherLogits`), which is what a
    top-k teacher cache gives; without it such a cache is refused before training.
    ``temperatures`` (with ``accepts_top_k``): the temperature at which the
    term reads each teacher, in order -- a cache built with its tail mass
    (which depends on the temperature) is refused for any other.
    """

    teachers: tuple[str, ...]
    accepts_top_k: bool = False
    temperatures: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "teachers", tuple(self.teachers))
        if self.temperatures is not None:
            object.__setattr__(self, "temperatures", tuple(float(t) for t in self.temperatures))
            if len(self.temperatures) != len(self.teachers):
                raise ValueError(f"temperatures must give one value per teacher {list(self.teachers)}, got "
                                 f"{list(self.temperatures)}")


@dataclass(frozen=True)
class TeacherLayer(InputKey):
    """The output of teacher ``teacher``'s submodule ``layer`` on ``stream`` (a constant, via a forward hook)."""

    teacher: str
    layer: str


class StepInputs:
    """The values of one step's declared inputs: ``step[key]``.

    ``step.step`` is the index of the optimiser step being computed (0 for the
    first), e.g. for a term whose weight warms up; ``step.batch_sizes`` the
    number of images drawn from each stream.
    """

    def __init__(self, step: int, values: Mapping[InputKey, torch.Tensor],
                 batch_sizes: Mapping[str, int] | None = None) -> None:
        self.step = step
        self._values = dict(values)
        self.batch_sizes = dict(batch_sizes or {})

    def __getitem__(self, key: InputKey) -> torch.Tensor:
        try:
            return self._values[key]
        except KeyError:
            raise KeyError(f"{key.describe()} was not declared by any objective term (declare it in bind() "
                           "with setup.need(key))") from None

    def __contains__(self, key: InputKey) -> bool:
        return key in self._values

    def keys(self):
        return self._values.keys()
