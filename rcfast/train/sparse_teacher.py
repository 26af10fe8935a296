"""``SparseTeacherLogits``: teachers given as their top-k logits per sample, the value a top-k teacher cache yields.

A dense teacher source gives a step ``[B, sum(C_t)]`` packed logits. A top-k
cache (:mod:`rcfast.train.teacher_cache`) gives, per sample and teacher, only
its k largest logits and their class indices: ``values [B, T, k]`` and
``indices [B, T, k]`` (int32, the class within the teacher's head). The
teacher's distribution is the softmax over those k entries and 0 on every other
class; an entry whose value is ``-inf`` is padding (a teacher with fewer than k
classes), its index is never read. This is the input of
:func:`rcfast.sparse_multihead_kd_loss`.

Terms that can use a top-k teacher declare ``TeacherLogits(..., top_k_ok=True)``
and receive this object instead of a tensor when the run's teacher source has
only the top k; the others are refused before training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

__all__ = ["SparseTeacherLogits"]


@dataclass
class SparseTeacherLogits:
    """Top-k teacher logits of a batch: ``values [B, T, k]``, ``indices [B, T, k]`` (int32), ``teachers`` (T names).

    ``num_classes[t]`` is teacher ``t``'s number of classes (the range of its indices).
    """

    values: torch.Tensor
    indices: torch.Tensor
    teachers: tuple[str, ...]
    num_classes: Mapping[str, int]

    def __post_init__(self) -> None:
        self.teachers = tuple(self.teachers)
        if self.values.dim() != 3 or self.indices.shape != self.values.shape:
            raise ValueError(f"values and indices must both be [B, T, k], got {tuple(self.values.shape)} and "
                             f"{tuple(self.indices.shape)}")
        if self.values.shape[1] != len(self.teachers):
            raise ValueError(f"values hold {self.values.shape[1]} teachers but {len(self.teachers)} are named")

    @property
    def top_k(self) -> int:
        return int(self.values.shape[2])

    @property
    def splits(self) -> list[int]:
        """The teachers' class counts, in order (the packed head sizes of the matching student logits)."""
        return [int(self.num_classes[t]) for t in self.teachers]

    def select(self, teachers: Sequence[str]) -> "SparseTeacherLogits":
        """The same batch for ``teachers`` (a subset, in that order): a view when nothing is reordered."""
        teachers = tuple(teachers)
        if teachers == self.teachers:
            return self
        position = {name: i for i, name in enumerate(self.teachers)}
        missing = [t for t in teachers if t not in position]
        if missing:
            raise KeyError(f"no top-k logits of teacher(s) {missing}; these hold {list(self.teachers)}")
        rows = [position[t] for t in teachers]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            values, indices = self.values[:, rows[0]:rows[-1] + 1], self.indices[:, rows[0]:rows[-1] + 1]
        else:
            index = torch.tensor(rows, device=self.values.device)
            values, indices = self.values.index_select(1, index), self.indices.index_select(1, index)
        return SparseTeacherLogits(values, indices, teachers, self.num_classes)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Packed ``[B, sum(C_t)]`` logits with ``-inf`` at every class outside the top k.

        The dense loss on this tensor is the top-k loss (a ``-inf`` teacher
        logit has probability 0), so it is the reference semantics of the
        sparse loss; it costs the dense memory the top-k form saves.
        """
        batch = self.values.shape[0]
        blocks = []
        for t, size in enumerate(self.splits):
            block = torch.full((batch, size), float("-inf"), dtype=dtype, device=self.values.device)
            values = self.values[:, t].to(dtype)
            entry = ~torch.isneginf(values)
            # Padding entries scatter -inf onto class 0: a no-op unless a real entry is there,
            # and then scatter_ order would matter, so padding goes to a scratch column instead.
            scratch = torch.cat([block, block[:, :1]], dim=1)
            index = torch.where(entry, self.indices[:, t].to(torch.int64), size)
            scratch.scatter_(1, index, values)
            blocks.append(scratch[:, :size])
        return torch.cat(blocks, dim=1)
