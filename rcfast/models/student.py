"""``MultiHeadStudent``: a backbone plus every head packed into one ``nn.Linear``.

The student of representation consolidation has one head per teacher. Keeping
the heads as one ``Linear(feature_dim, sum(C_h))`` means all heads cost a single
GEMM and the output is already the packed ``[B, sum(C_h)]`` layout that
:func:`rcfast.multihead_kd_loss` takes with ``splits=student.splits`` -- no
per-head matmuls and no concatenation copy.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

__all__ = ["MultiHeadStudent"]


class MultiHeadStudent(nn.Module):
    """A backbone ``phi`` and heads ``h_k`` stored as one packed linear layer.

    Args:
        backbone: any ``nn.Module`` mapping images to features ``[B, feature_dim]``.
        feature_dim: the backbone's feature width.
        heads: ordered ``{head_name: num_classes}``; the order is the order of
            the heads in the packed logits (and of the teachers in the loss).

    ``student(x)`` returns packed logits ``[B, sum(C_h)]``; feed them to
    ``rcfast.multihead_kd_loss(logits, teacher_logits, splits=student.splits)``.
    ``student.head_logits(logits)`` splits them into per-head views.

    The packed layer is initialised exactly like separate ``nn.Linear`` heads
    would be: torch's default init depends only on ``fan_in = feature_dim``.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, heads: Mapping[str, int]) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if not isinstance(feature_dim, int) or isinstance(feature_dim, bool) or feature_dim <= 0:
            raise ValueError(f"feature_dim must be a positive int, got {feature_dim!r}")
        if not isinstance(heads, Mapping) or len(heads) == 0:
            raise ValueError(f"heads must be a non-empty mapping {{name: num_classes}}, got {heads!r}")
        for name, size in heads.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"heads: every head name must be a non-empty string, got {name!r}")
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ValueError(f"heads[{name!r}] must be a positive int number of classes, got {size!r}")
        self.backbone = backbone
        self.feature_dim = feature_dim
        self._head_names = tuple(heads.keys())
        self._splits = tuple(int(c) for c in heads.values())
        self.heads = nn.Linear(feature_dim, sum(self._splits))

    @property
    def head_names(self) -> tuple[str, ...]:
        """Head names in packed order."""
        return self._head_names

    @property
    def splits(self) -> tuple[int, ...]:
        """Classes per head in packed order: the ``splits=`` of the loss."""
        return self._splits

    @property
    def num_classes(self) -> int:
        """Total packed logit columns, ``sum(splits)``."""
        return sum(self._splits)

    def head_slices(self) -> dict[str, slice]:
        """``{head_name: slice}`` of each head's columns in the packed logits."""
        out, start = {}, 0
        for name, size in zip(self._head_names, self._splits):
            out[name] = slice(start, start + size)
            start += size
        return out

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features ``[B, feature_dim]``."""
        feats = self.backbone(images)
        if feats.dim() != 2 or feats.shape[1] != self.feature_dim:
            raise ValueError(
                f"the backbone returned features of shape {tuple(feats.shape)}, but MultiHeadStudent "
                f"was built with feature_dim={self.feature_dim}; the backbone must return [B, feature_dim]"
            )
        return feats

    def forward(self, images: torch.Tensor, with_heads: bool = True) -> torch.Tensor:
        """Packed logits ``[B, sum(C_h)]`` of all heads (one GEMM).

        ``with_heads=False``: the backbone's features ``[B, feature_dim]`` only,
        for a loss that applies the packed head itself
        (:func:`rcfast.fused_linear_multihead_kd_loss` with ``self.heads``). A
        keyword of ``forward`` rather than a separate method, so that it also
        goes through a ``DistributedDataParallel`` wrapper.
        """
        features = self.features(images)
        return self.heads(features) if with_heads else features

    def head_logits(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split packed logits into ``{head_name: [B, C_h]}`` views (no copies)."""
        if packed.dim() != 2 or packed.shape[1] != self.num_classes:
            raise ValueError(
                f"packed must be [B, {self.num_classes}] (the heads {dict(zip(self._head_names, self._splits))}), "
                f"got shape {tuple(packed.shape)}"
            )
        return dict(zip(self._head_names, torch.split(packed, self._splits, dim=1)))

    def extra_repr(self) -> str:
        heads = ", ".join(f"{n}={c}" for n, c in zip(self._head_names, self._splits))
        return f"feature_dim={self.feature_dim}, heads=({heads})"
