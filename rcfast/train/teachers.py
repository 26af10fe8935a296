"""Teachers: loading them from checkpoints and packing their logits for the fused loss.

A teacher checkpoint is data: it is read with ``torch.load(weights_only=True)``
into an architecture built by name (:func:`rcfast.models.build_classifier`).
:class:`TeacherEnsemble` runs all teachers in ``eval()`` under
``torch.inference_mode()`` (and the run's autocast) and writes their logits
side by side into one preallocated ``[B, sum(C_h)]`` buffer in head order --
the packed teacher tensor :func:`rcfast.multihead_kd_loss` takes.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from rcfast.models import build_classifier
from rcfast.train.config import TeacherConfig

__all__ = ["load_teacher", "TeacherEnsemble", "extract_model_state"]


def extract_model_state(checkpoint) -> dict:
    """The model state_dict inside a loaded checkpoint.

    Accepts a plain state_dict or an rcfast checkpoint (``{"model": ...}``);
    strips the ``module.`` prefix DDP-wrapped models save with.
    """
    state = checkpoint
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("the checkpoint holds neither a state_dict nor an rcfast checkpoint with 'model'")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def load_teacher(cfg: TeacherConfig, device: torch.device | str = "cpu") -> nn.Module:
    """Build ``cfg.builder`` with ``cfg.num_classes`` outputs and load ``cfg.checkpoint`` into it.

    Returns the teacher in ``eval()`` mode with gradients off. Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` naming the
    teacher when the checkpoint does not fit the architecture.
    """
    path = Path(cfg.checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"teacher {cfg.name!r}: checkpoint file {path} does not exist")
    try:
        model = build_classifier(cfg.builder, cfg.num_classes, **cfg.builder_kwargs)
    except (ValueError, TypeError, ImportError) as exc:
        raise type(exc)(f"teacher {cfg.name!r}: cannot build {cfg.builder!r}: {exc}") from exc
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = extract_model_state(checkpoint)
    except Exception as exc:  # unpickling errors, wrong contents: all mean "not a usable checkpoint"
        raise ValueError(f"teacher {cfg.name!r}: {path} is not a loadable weights-only checkpoint: {exc}") from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(
            f"teacher {cfg.name!r}: checkpoint {path} does not fit builder {cfg.builder!r} with "
            f"num_classes={cfg.num_classes} and builder_kwargs={cfg.builder_kwargs}: {exc}"
        ) from exc
    return model.to(device).eval().requires_grad_(False)


class TeacherEnsemble:
    """All teachers, producing one packed ``[B, sum(C_h)]`` logit tensor per batch.

    Args:
        teachers: ``{head_name: module}``; every module maps images to ``[B, C_h]``.
        head_names: the packed order (the student's heads).
        splits: ``C_h`` per head, in the same order.
        autocast: a zero-argument callable returning the autocast context to
            run the teachers in (``contextlib.nullcontext`` for none).
    """

    def __init__(self, teachers: Mapping[str, nn.Module], head_names: Sequence[str], splits: Sequence[int],
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        missing = [h for h in head_names if h not in teachers]
        extra = [t for t in teachers if t not in head_names]
        if missing or extra:
            raise ValueError(f"teachers {sorted(teachers)} must match the student's heads {list(head_names)} "
                             f"(no teacher for {missing}; no head for {extra})")
        self.head_names = tuple(head_names)
        self.splits = tuple(splits)
        self.teachers = [teachers[h] for h in self.head_names]
        self.autocast = autocast
        self._buffer: torch.Tensor | None = None
        for teacher in self.teachers:
            teacher.eval().requires_grad_(False)

    def to(self, device) -> "TeacherEnsemble":
        self.teachers = [t.to(device) for t in self.teachers]
        self._buffer = None
        return self

    def _packed_buffer(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        buf = self._buffer
        if buf is None or buf.shape[0] < batch or buf.dtype != like.dtype or buf.device != like.device:
            # Allocated outside inference mode so the buffer is a normal tensor the
            # loss may keep for backward; its rows are overwritten every step.
            with torch.inference_mode(False):
                buf = torch.empty(batch, sum(self.splits), dtype=like.dtype, device=like.device)
            self._buffer = buf
        return buf[:batch]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Packed teacher logits for ``images`` (a view of a reused buffer)."""
        packed = None
        start = 0
        with torch.inference_mode(), self.autocast():
            for name, size, teacher in zip(self.head_names, self.splits, self.teachers):
                logits = teacher(images)
                if logits.dim() != 2 or logits.shape[0] != images.shape[0] or logits.shape[1] != size:
                    raise ValueError(f"teacher {name!r} produced logits of shape {tuple(logits.shape)}, "
                                     f"but its student head has {size} classes (expected [{images.shape[0]}, {size}])")
                if packed is None:
                    packed = self._packed_buffer(images.shape[0], logits)
                packed[:, start:start + size].copy_(logits)
                start += size
        return packed
