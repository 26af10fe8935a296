"""``cross_entropy``: hard-label cross-entropy on one student head.

Options (YAML ``{term: cross_entropy, ...}``):

- ``head``: the student head (default: the student's only head).
- ``data``: the labeled data stream (default: the task stream named like the
  head when there is one -- the supervised/oracle set-up, each head on its own
  task -- else ``proxy``, which then needs ``data.labels: true``).
- ``label_smoothing``: as in ``torch.nn.functional.cross_entropy`` (default 0).

Computed in float32 on the head's logits (also under bf16/fp16 autocast).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rcfast.train.objectives.base import Term, TermSetup, register_term
from rcfast.train.objectives.inputs import Labels, StepInputs, StudentLogits

__all__ = ["CrossEntropy"]


@register_term("cross_entropy")
class CrossEntropy(Term):
    """Mean cross-entropy of one head's logits against the stream's labels."""

    def __init__(self, head: str | None = None, data: str | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if head is not None and not isinstance(head, str):
            raise TypeError(f"head must be a head name, got {head!r}")
        if data is not None and not isinstance(data, str):
            raise TypeError(f"data must be a data stream name, got {data!r}")
        if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float))
                or not math.isfinite(label_smoothing) or not 0.0 <= label_smoothing <= 1.0):
            raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
        self.head, self.data, self.label_smoothing = head, data, float(label_smoothing)

    def bind(self, setup: TermSetup) -> None:
        head = self.head
        if head is None:
            if len(setup.heads) != 1:
                raise setup.error(f"head: the student has {len(setup.heads)} heads {list(setup.heads)}; "
                                  "say which one this term trains")
            head = next(iter(setup.heads))
        setup.head(head)
        stream = self.data if self.data is not None else (head if head in setup.streams else None)
        stream = setup.stream(stream)
        known = setup.streams[stream].num_classes
        if known is not None and known > setup.heads[head]:
            raise setup.error(f"the data stream {stream!r} has {known} classes but head {head!r} only "
                              f"{setup.heads[head]}")
        self.logits_key = setup.need(StudentLogits(stream, (head,)))
        self.labels_key = setup.need(Labels(stream))

    def forward(self, step: StepInputs) -> torch.Tensor:
        return F.cross_entropy(step[self.logits_key].float(), step[self.labels_key],
                               label_smoothing=self.label_smoothing)
