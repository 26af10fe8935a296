"""Inheritance and exploration KD (IE-KD, arXiv 2107.00181): the losses.

The student's feature map is split by channels into an *inheritance* part and an
*exploration* part (:class:`ChannelSplit`); each part is encoded into a factor by
its own :class:`~rcfast.models.autoencoder.ConvCoder`. The teacher's factor comes
from a pretrained, frozen :class:`~rcfast.models.FactorAutoEncoder`. With
``n(x) = x.flatten(1) / ||x.flatten(1)||_2`` (per sample):

- :func:`inheritance_loss` ``= mean |n(s) - n(t)|`` pulls the inheritance factor
  towards the teacher's (mean over batch and elements);
- :func:`exploration_loss` pushes the exploration factor away, one of
  ``"l1"``: ``-mean |n(s) - n(t)|``; ``"cos"``: mean over the batch of
  ``|cos(s_b, t_b)|``; ``"cka"``: linear CKA of the centred ``[B, D]`` matrices,
  ``||T^T S||_F^2 / (||S^T S||_F ||T^T T||_F)`` (of the raw flattened factors,
  as the authors' release computes it, not of ``n(s)``, ``n(t)``).

:class:`IEKDLoss` owns the split and the two student-side encoders and returns
``w_inh * L_inh + w_exp * L_exp`` with both parts. The task loss (cross-entropy
and/or KD) is added by the caller (in ``rcfast consolidate``: other objective
terms).

Half-precision inputs are computed in float32 and float64 stays float64 (for
gradcheck); the losses are float32 or float64.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rcfast.models.autoencoder import ConvCoder

__all__ = ["EXPLORATION_KINDS", "SPLIT_MODES", "ChannelSplit", "IEKDLoss", "IEKDOutput", "exploration_loss",
           "inheritance_loss", "linear_cka"]

EXPLORATION_KINDS = ("l1", "cos", "cka")
SPLIT_MODES = ("natural", "random")


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _flat_factors(student_factor: torch.Tensor, teacher_factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both factors checked and flattened to ``[B, D]`` in the compute dtype."""
    for name, factor in (("student_factor", student_factor), ("teacher_factor", teacher_factor)):
        if not isinstance(factor, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(factor).__name__}")
        if not factor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {factor.dtype}")
        if factor.dim() < 2 or factor.shape[0] == 0 or factor[0].numel() == 0:
            raise ValueError(f"{name} must be [B, ...] with B > 0 and at least one element per sample, "
                             f"got shape {tuple(factor.shape)}")
    if student_factor.shape != teacher_factor.shape:
        raise ValueError(f"student_factor {tuple(student_factor.shape)} and teacher_factor "
                         f"{tuple(teacher_factor.shape)} must have the same shape: give both encoders the same "
                         "factor_channels and compare feature maps of the same spatial size")
    if student_factor.device != teacher_factor.device:
        raise ValueError(f"student_factor is on {student_factor.device}, teacher_factor on {teacher_factor.device}")
    dtype = _compute_dtype(student_factor)
    return student_factor.flatten(1).to(dtype), teacher_factor.flatten(1).to(dtype)


def _normalized_difference(student_factor: torch.Tensor, teacher_factor: torch.Tensor) -> torch.Tensor:
    s, t = _flat_factors(student_factor, teacher_factor)
    # F.normalize clamps the norm at 1e-12, so an all-zero factor gives 0, not NaN.
    return F.normalize(s, dim=1) - F.normalize(t, dim=1)


def inheritance_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor) -> torch.Tensor:
    """``mean |n(s) - n(t)|`` over batch and elements; ``n`` flattens and L2-normalises each sample.

    Both factors are ``[B, ...]`` of the same shape; gradients flow to both (detach
    the teacher's factor to keep it fixed, as :class:`IEKDLoss` does).
    """
    return _normalized_difference(student_factor, teacher_factor).abs().mean()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA of two ``[B, D_x]``, ``[B, D_y]`` matrices after centring each column over the batch.

    ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``, in ``[0, 1]``. Computed through
    the ``[B, B]`` Gram matrices when that is smaller (the same value:
    ``||Y^T X||_F^2 = <X X^T, Y Y^T>_F`` and ``||X^T X||_F = ||X X^T||_F``). Needs
    ``B >= 2``; a matrix that is constant over the batch has no CKA, and gives 0.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs two [B, D] matrices with the same B, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"linear CKA needs a batch of at least 2 samples, got {x.shape[0]}")
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    if x.shape[0] <= max(x.shape[1], y.shape[1]):
        gram_x, gram_y = x @ x.T, y @ y.T
        cross = (gram_x * gram_y).sum()
        norm_x, norm_y = torch.linalg.matrix_norm(gram_x), torch.linalg.matrix_norm(gram_y)
    else:
        cross = torch.linalg.matrix_norm(y.T @ x).square()
        norm_x, norm_y = torch.linalg.matrix_norm(x.T @ x), torch.linalg.matrix_norm(y.T @ y)
    denominator = norm_x * norm_y
    # A constant matrix has cross = 0 and denominator = 0: report 0 (no shared
    # structure) instead of 0/0, so one dead batch does not poison a run.
    return torch.where(denominator > 0, cross / denominator.clamp_min(torch.finfo(denominator.dtype).tiny),
                       torch.zeros_like(cross))


def exploration_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """The exploration loss of ``kind`` (minimised: it rewards *unlike* factors).

    - ``"l1"``: ``-mean |n(s) - n(t)|`` (the negative of :func:`inheritance_loss`);
    - ``"cos"``: mean over the batch of ``|cos(s_b, t_b)|`` of the flattened factors;
    - ``"cka"``: :func:`linear_cka` of the flattened ``[B, D]`` factors (``B >= 2``).
    """
    if kind not in EXPLORATION_KINDS:
        raise ValueError(f"kind must be one of {EXPLORATION_KINDS}, got {kind!r}")
    if kind == "l1":
        return -_normalized_difference(student_factor, teacher_factor).abs().mean()
    s, t = _flat_factors(student_factor, teacher_factor)
    if kind == "cos":
        return (F.normalize(s, dim=1) * F.normalize(t, dim=1)).sum(dim=1).abs().mean()
    return linear_cka(s, t)


class ChannelSplit(nn.Module):
    """Splits a feature map's channels into an inheritance part and an exploration part.

    Args:
        channels: ``C``, the channels of the student's feature map.
        mode: ``"natural"``: the first ``inherit_channels`` channels inherit, the
            rest explore. ``"random"``: a permutation of the channels drawn from a
            private ``torch.Generator`` seeded with ``seed`` (the global RNG is not
            touched); its first ``inherit_channels`` entries inherit.
        seed: the permutation's seed (``"random"`` only).
        inherit_channels: channels of the inheritance part; by default ``C / 2``,
            which needs an even ``C``. An odd ``C`` is an error, not a silent
            choice: the authors' release gives ``floor(C / 2)`` to inheritance and
            the rest to exploration; pass ``inherit_channels=C // 2`` to do that.

    The indices are persistent buffers (``inherit_index``, ``explore_index``), so
    the split is saved and restored with the model's ``state_dict``; a loaded
    split is checked to be a partition of ``range(C)``.
    """

    def __init__(self, channels: int, mode: str = "natural", seed: int = 0,
                 inherit_channels: int | None = None) -> None:
        super().__init__()
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 2:
            raise ValueError(f"channels must be an int >= 2 (one channel per part at least), got {channels!r}")
        if mode not in SPLIT_MODES:
            raise ValueError(f"split mode must be one of {SPLIT_MODES}, got {mode!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if inherit_channels is None:
            if channels % 2:
                raise ValueError(
                    f"channels={channels} is odd, so it has no two equal halves: pass inherit_channels "
                    f"(e.g. {channels // 2}, as the authors' release does, giving exploration "
                    f"{channels - channels // 2})")
            inherit_channels = channels // 2
        if (not isinstance(inherit_channels, int) or isinstance(inherit_channels, bool)
                or not 0 < inherit_channels < channels):
            raise ValueError(f"inherit_channels must be an int in [1, {channels - 1}], got {inherit_channels!r}")
        self.channels, self.mode, self.seed = channels, mode, seed
        if mode == "natural":
            order = torch.arange(channels)
        else:
            order = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("inherit_index", order[:inherit_channels].clone())
        self.register_buffer("explore_index", order[inherit_channels:].clone())
        self.register_load_state_dict_post_hook(ChannelSplit._check_loaded)

    @property
    def inherit_channels(self) -> int:
        return self.inherit_index.numel()

    @property
    def explore_channels(self) -> int:
        return self.explore_index.numel()

    @staticmethod
    def _check_loaded(module: "ChannelSplit", incompatible_keys) -> None:
        # A state dict is data from a file: a split that is not a partition of the
        # channels would index out of range (or silently drop channels) later.
        both = torch.cat([module.inherit_index, module.explore_index]).cpu()
        if (both.dtype != torch.int64 or both.numel() != module.channels
                or not torch.equal(both.sort().values, torch.arange(module.channels))):
            raise ValueError(f"the loaded channel split is not a partition of range({module.channels}): "
                             f"inherit_index={module.inherit_index.tolist()}, "
                             f"explore_index={module.explore_index.tolist()}")

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inherit_part, explore_part)`` of ``features [B, C, ...]`` (channel dim 1)."""
        if features.dim() < 2 or features.shape[1] != self.channels:
            raise ValueError(f"features must be [B, {self.channels}, ...] (the split's channels), "
                             f"got shape {tuple(features.shape)}")
        return features.index_select(1, self.inherit_index), features.index_select(1, self.explore_index)

    def extra_repr(self) -> str:
        seed = f", seed={self.seed}" if self.mode == "random" else ""
        return (f"channels={self.channels}, mode={self.mode!r}{seed}, inherit={self.inherit_channels}, "
                f"explore={self.explore_channels}")


class IEKDOutput(NamedTuple):
    """``loss = inherit_weight * inherit + explore_weight * explore``, and both parts."""

    loss: torch.Tensor
    inherit: torch.Tensor
    explore: torch.Tensor


def _weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a float >= 0, got {value!r}")
    return float(value)


class IEKDLoss(nn.Module):
    """IE-KD's feature terms: the split, the student-side encoders, both losses.

    Args:
        student_channels: channels ``C`` of the student's feature map.
        factor_channels: channels of every factor (the teacher auto-encoder's
            ``factor_channels``).
        split, seed, inherit_channels: of the :class:`ChannelSplit`.
        exploration: ``"l1"``, ``"cos"`` or ``"cka"`` (see :func:`exploration_loss`).
        inherit_weight, explore_weight: ``w_inh``, ``w_exp`` (>= 0).

    ``loss_fn(student_features, teacher_factor)`` with ``student_features``
    ``[B, C, H, W]`` and ``teacher_factor`` ``[B, factor_channels, H, W]`` returns an
    :class:`IEKDOutput`. The teacher factor is a target: it is detached. The
    encoders are trainable parameters of this module: give them to the
    optimiser with the student's.
    """

    def __init__(self, student_channels: int, factor_channels: int, *, split: str = "natural", seed: int = 0,
                 inherit_channels: int | None = None, exploration: str = "l1", inherit_weight: float = 1.0,
                 explore_weight: float = 1.0) -> None:
        super().__init__()
        if exploration not in EXPLORATION_KINDS:
            raise ValueError(f"exploration must be one of {EXPLORATION_KINDS}, got {exploration!r}")
        self.exploration = exploration
        self.inherit_weight = _weight("inherit_weight", inherit_weight)
        self.explore_weight = _weight("explore_weight", explore_weight)
        self.split = ChannelSplit(student_channels, split, seed, inherit_channels)
        self.inherit_encoder = ConvCoder(self.split.inherit_channels, factor_channels)
        self.explore_encoder = ConvCoder(self.split.explore_channels, factor_channels)

    def factors(self, student_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inherit_factor, explore_factor)`` of the student's feature map."""
        inherit_part, explore_part = self.split(student_features)
        return self.inherit_encoder(inherit_part), self.explore_encoder(explore_part)

    def forward(self, student_features: torch.Tensor, teacher_factor: torch.Tensor) -> IEKDOutput:
        inherit_factor, explore_factor = self.factors(student_features)
        target = teacher_factor.detach()
        inherit = inheritance_loss(inherit_factor, target)
        explore = exploration_loss(explore_factor, target, self.exploration)
        return IEKDOutput(self.inherit_weight * inherit + self.explore_weight * explore, inherit, explore)

    def extra_repr(self) -> str:
        return (f"exploration={self.exploration!r}, inherit_weight={self.inherit_weight}, "
                f"explore_weight={self.explore_weight}")
