"""``SparseTeacherLogits``: teachers given as their top-k logits per sample, the value a top-k teacher cache yields.

A dense teacher source gives a step ``[B, sum(C_t)]`` packed logits. A top-k
cache (:mod:`rcfast.train.teacher_cache`) gives, per sample and teacher, only
its k largest logits and their class indices: ``values [B, T, k]`` and
``indices [B, T, k]`` (int32, the class within the teacher's head). The
teacher's distribution is the softmax over those k entries and 0 on every other
class; an entry whose value is ``-inf`` is padding (a teacher with fewer than k
classes), its index is never read. This is the input of
:func:`rcfast.sparse_multihead_kd_loss`.

A cache built with its *tail mass* (``rcfast cache-teachers``' default for top-k)
also gives ``fill [B, T]``: the logit of every class outside the k. It is
chosen so that at the run's temperature the teacher's softmax keeps its exact
top-k probabilities and the exact total mass of the other classes, spread
evenly over them (as FKD's soft labels do), instead of renormalising the k
entries; see :func:`rcfast.train.teacher_cache.top_k_rows`.

Terms that can use a top-k teacher declare ``TeacherLogits(..., accepts_top_k=True)``
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

    ``num_classes[t]`` is teacher ``t``'s number of classes (the range of its
    indices). ``fill [B, T]`` (optional): the logit of each class outside the
    top k; ``None`` means ``-inf`` (probability 0: the k entries renormalised).
    """

    values: torch.Tensor
    indices: torch.Tensor
    teachers: tuple[str, ...]
    num_classes: Mapping[str, int]
    fill: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.teachers = tuple(self.teachers)
        if self.values.dim() != 3 or self.indices.shape != self.values.shape:
            raise ValueError(f"values and indices must both be [B, T, k], got {tuple(self.values.shape)} and "
                             f"{tuple(self.indices.shape)}")
        if self.values.shape[1] != len(self.teachers):
            raise ValueError(f"values hold {self.values.shape[1]} teachers but {len(self.teachers)} are named")
        if self.fill is not None and self.fill.shape != self.values.shape[:2]:
            raise ValueError(f"fill must be [B, T] = {tuple(self.values.shape[:2])}, got {tuple(self.fill.shape)}")

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
            pick = lambda x: None if x is None else x[:, rows[0]:rows[-1] + 1]  # noqa: E731
        else:
            index = torch.tensor(rows, device=self.values.device)
            pick = lambda x: None if x is None else x.index_select(1, index)  # noqa: E731
        return SparseTeacherLogits(pick(self.values), pick(self.indices), teachers, self.num_classes,
                                   pick(self.fill))

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Packed ``[B, sum(C_t)]`` logits: the k entries at their classes, ``fill`` (or ``-inf``) at every other.

        Without ``fill`` the dense loss on this tensor is the top-k loss (a
        ``-inf`` teacher logit has probability 0), so it is the reference
        semantics of the sparse loss; with ``fill`` it is the teacher with its
        tail mass. Either way it costs the dense memory the top-k form saves.
        """
        batch = self.values.shape[0]
        blocks = []
        for t, size in enumerate(self.splits):
            if self.fill is None:
                block = torch.full((batch, size), float("-inf"), dtype=dtype, device=self.values.device)
            else:
                block = self.fill[:, t:t + 1].to(dtype).expand(batch, size)
            values = self.values[:, t].to(dtype)
            entry = ~torch.isneginf(values)
            # Padding entries scatter -inf onto class 0: a no-op unless a real entry is there,
            # and then scatter_ order would matter, so padding goes to a scratch column instead.
            scratch = torch.cat([block, block[:, :1]], dim=1)
            index = torch.where(entry, self.indices[:, t].to(torch.int64), size)
            scratch.scatter_(1, index, values)
            blocks.append(scratch[:, :size])
        return torch.cat(blocks, dim=1)
