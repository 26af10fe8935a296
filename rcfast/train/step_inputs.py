"""``InputPlan``: compute every input the objective declared, once per step.

From the declared keys the plan knows, before training starts:

- which data streams to draw a batch from (in the run's stream order);
- which streams the student runs on -- one forward over their images
  concatenated in that order (every head's GEMM stays one packed GEMM), with
  forward hooks on the declared student layers; when terms apply the packed head
  themselves (:class:`StudentHeadLinear`) and none reads the logits, the
  forward stops at the backbone and no logits are made;
- per stream, which teachers run (ordered by first request, so a term asking for
  all of them in its own order reads the packed buffer without a copy) and which
  of their layers to capture.

Per step it draws the batches, runs the teachers (``TeacherSource``), then the
student (under the run's autocast), and returns a :class:`StepInputs` whose
entries are views of those single results (a concatenation only when a term
selects heads or teachers that are not side by side).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from rcfast.train.hooks import LayerCapture
from rcfast.train.objectives.inputs import (Images, InputKey, Labels, StepInputs, StudentHeadLinear, StudentLayer,
                                            StudentLogits, TeacherLayer, TeacherLogits)
from rcfast.train.sparse_teacher import SparseTeacherLogits
from rcfast.train.teachers import TeacherRequest, TeacherSource

__all__ = ["InputPlan", "select_columns"]


def select_columns(packed: torch.Tensor, order: Sequence[str], sizes: Mapping[str, int],
                   wanted: Sequence[str], dim: int = 1) -> torch.Tensor:
    """The ``wanted`` blocks of ``packed`` along ``dim`` (blocks ``order`` of ``sizes`` side by side).

    All blocks in order: ``packed`` itself; a contiguous run: a view; otherwise
    one concatenation.
    """
    wanted = tuple(wanted)
    if wanted == tuple(order):
        return packed
    offsets, start = {}, 0
    for name in order:
        offsets[name] = start
        start += sizes[name]
    index = [list(order).index(name) for name in wanted]
    if index == list(range(index[0], index[0] + len(index))):
        begin = offsets[wanted[0]]
        return packed.narrow(dim, begin, sum(sizes[n] for n in wanted))
    return torch.cat([packed.narrow(dim, offsets[n], sizes[n]) for n in wanted], dim=dim)


def _split_batch(batch, stream: str):
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError(f"data stream {stream!r} must yield images or (images, labels) batches, "
                             f"got a {type(batch).__name__} of {len(batch)}")
        return batch[0], batch[1]
    return batch, None


class InputPlan:
    """What to compute each step for the declared ``keys`` (see the module docstring).

    Args:
        keys: the objective's declared inputs.
        stream_order: every stream of the run, in the order batches are drawn
            and concatenated for the student.
        student: the student module (hooks go on it; it is what ``model`` wraps).
        model: what to call for the student forward (the DDP wrapper or the student).
        teachers: the run's teacher source (``None`` when no term needs teachers).
        head_sizes: ``{head: C_h}`` in the student's packed order.
        device: where inputs go.
        autocast: zero-argument callable giving the student's autocast context.
    """

    def __init__(self, keys: Sequence[InputKey], stream_order: Sequence[str], student: nn.Module,
                 model: nn.Module, teachers: TeacherSource | None, head_sizes: Mapping[str, int],
                 device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        self.keys = list(keys)
        used = {k.stream for k in self.keys}
        self.streams = [s for s in stream_order if s in used]
        student_keys = [k for k in self.keys if isinstance(k, (StudentLogits, StudentLayer, StudentHeadLinear))]
        head_linear = any(isinstance(k, StudentHeadLinear) for k in self.keys)
        if head_linear and not isinstance(getattr(student, "heads", None), nn.Linear):
            raise TypeError("an objective term applies the student's packed head itself (StudentHeadLinear), but "
                            f"the student ({type(student).__name__}) has no nn.Linear 'heads' layer; use "
                            "rcfast.models.MultiHeadStudent")
        #: no term reads logits: the student's forward stops at the backbone (``with_heads=False``)
        self.features_only = head_linear and not any(isinstance(k, StudentLogits) for k in self.keys)
        self.student_streams = [s for s in self.streams if any(k.stream == s for k in student_keys)]
        self.student_layers = tuple(dict.fromkeys(k.layer for k in self.keys if isinstance(k, StudentLayer)))
        self.teacher_plan: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, ...]]]] = {}
        for stream in self.streams:
            order: list[str] = []
            layers: dict[str, list[str]] = {}
            for key in self.keys:
                if key.stream != stream:
                    continue
                if isinstance(key, TeacherLogits):
                    order.extend(t for t in key.teachers if t not in order)
                elif isinstance(key, TeacherLayer):
                    if key.teacher not in order:
                        order.append(key.teacher)
                    layers.setdefault(key.teacher, [])
                    if key.layer not in layers[key.teacher]:
                        layers[key.teacher].append(key.layer)
            if order:
                self.teacher_plan[stream] = (tuple(order), {t: tuple(v) for t, v in layers.items()})
        if self.teacher_plan and teachers is None:
            raise ValueError("the objective needs teacher outputs but the run has no teachers")
        if teachers is not None:
            teachers.check_inputs(self.keys)
        self.student, self.model, self.teachers = student, model, teachers
        self.head_sizes = dict(head_sizes)
        self.device = device
        self.autocast = autocast

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)

    def compute(self, batches: Mapping[str, object], step: int,
                positions: Mapping[str, tuple[int, int] | None] | None = None) -> StepInputs:
        """The declared inputs for one step from ``{stream: batch}`` (a batch of every stream in ``self.streams``).

        ``positions``: ``{stream: (epoch, batch index)}`` of those batches, passed on to the teacher source.
        """
        positions = positions or {}
        images, labels = {}, {}
        for stream in self.streams:
            x, y = _split_batch(batches[stream], stream)
            images[stream] = self._to_device(x)
            if y is not None:
                labels[stream] = self._to_device(y)

        teacher_logits, teacher_layers = {}, {}
        for stream, (order, layers) in self.teacher_plan.items():
            out = self.teachers(TeacherRequest(stream=stream, step=step, images=images[stream], teachers=order,
                                               layers=layers, position=positions.get(stream)))
            teacher_logits[stream] = out.logits
            teacher_layers.update({(stream,) + key: value for key, value in out.layers.items()})

        rows: dict[str, tuple[int, int]] = {}
        student_logits, student_layers = None, {}
        if self.student_streams:
            start = 0
            for stream in self.student_streams:
                rows[stream] = (start, images[stream].shape[0])
                start += images[stream].shape[0]
            if len(self.student_streams) == 1:
                x = images[self.student_streams[0]]
            else:
                x = torch.cat([images[s] for s in self.student_streams])
            with LayerCapture(self.student, self.student_layers, owner="the student") as captured, self.autocast():
                if self.features_only:
                    self.model(x, with_heads=False)  # the terms read the backbone layer's capture
                else:
                    student_logits = self.model(x)
            student_layers = dict(captured)
        total_rows = sum(n for _, n in rows.values())

        def stream_rows(tensor: torch.Tensor, stream: str) -> torch.Tensor:
            begin, count = rows[stream]
            return tensor if count == total_rows else tensor.narrow(0, begin, count)

        values = {}
        for key in self.keys:
            if isinstance(key, Images):
                values[key] = images[key.stream]
            elif isinstance(key, Labels):
                if key.stream not in labels:
                    raise ValueError(f"data stream {key.stream!r} yielded a batch without labels, but an "
                                     "objective term needs its labels")
                values[key] = labels[key.stream]
            elif isinstance(key, StudentLogits):
                values[key] = select_columns(stream_rows(student_logits, key.stream), list(self.head_sizes),
                                             self.head_sizes, key.heads)
            elif isinstance(key, StudentLayer):
                values[key] = stream_rows(student_layers[key.layer], key.stream)
            elif isinstance(key, StudentHeadLinear):
                head = self.student.heads
                weight = select_columns(head.weight, list(self.head_sizes), self.head_sizes, key.heads, dim=0)
                bias = (None if head.bias is None else
                        select_columns(head.bias, list(self.head_sizes), self.head_sizes, key.heads, dim=0))
                values[key] = (weight, bias)
            elif isinstance(key, TeacherLogits):
                order = self.teacher_plan[key.stream][0]
                logits = teacher_logits[key.stream]
                if isinstance(logits, SparseTeacherLogits):  # top-k teachers (a cache): the term accepts them
                    values[key] = logits.select(key.teachers)
                else:
                    values[key] = select_columns(logits, order, self.teachers.num_classes, key.teachers)
            elif isinstance(key, TeacherLayer):
                values[key] = teacher_layers[(key.stream, key.teacher, key.layer)]
            else:
                raise TypeError(f"unknown input key {key!r}")
        return StepInputs(step, values, {s: images[s].shape[0] for s in self.streams})
