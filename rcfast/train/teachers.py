"""Teachers: loading them from checkpoints, and the one interface the trainer gets teacher outputs through.

A teacher checkpoint is data: it is read with ``torch.load(weights_only=True)``
into an architecture built by name (:func:`rcfast.models.build_classifier`).
A file rcfast wrote carries a content hash, verified on load; any file can be
pinned by its sha256 in the config (``teachers[].sha256``,
:func:`teacher_file_sha256`).

"Where teacher logits come from" is :class:`TeacherSource`: the trainer asks
it, once per step and data stream, for the packed logits of some teachers (and,
where terms need them, features of named teacher layers).
:class:`OnlineTeachers` runs teacher models in ``eval()`` under
``torch.inference_mode()`` (and the run's autocast) and writes their logits
side by side into a reused ``[B, sum(C_t)]`` buffer -- the packed layout
:func:`rcfast.multihead_kd_loss` takes. A cache of precomputed logits is another
``TeacherSource``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from rcfast.models import build_classifier
from rcfast.train.checkpoint import check_checkpoint_file, file_sha256, load_checkpoint
from rcfast.train.config import ConfigError, TeacherConfig
from rcfast.train.hooks import LayerCapture

__all__ = ["load_teacher", "teacher_file_sha256", "extract_model_state", "TeacherSource", "TeacherRequest",
           "TeacherOutputs", "OnlineTeachers"]


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


def teacher_file_sha256(cfg: TeacherConfig) -> str:
    """The sha256 of ``cfg.checkpoint``'s bytes, checked against ``cfg.sha256`` when the config pins one.

    Raises :class:`~rcfast.train.errors.CheckpointError` for a missing, empty or
    non-regular file and :class:`ConfigError` for a pin mismatch -- both naming
    the teacher.
    """
    path = check_checkpoint_file(cfg.checkpoint, what=f"teacher {cfg.name!r}: checkpoint")
    actual = file_sha256(path)
    if cfg.sha256 and actual != cfg.sha256.lower():
        raise ConfigError(f"teacher {cfg.name!r}: checkpoint {path} has sha256 {actual}, but teachers[].sha256 pins "
                          f"{cfg.sha256.lower()}: the file is not the one the config names (replaced or corrupt)")
    return actual


def load_teacher(cfg: TeacherConfig, device: torch.device | str = "cpu") -> nn.Module:
    """Build ``cfg.builder`` with ``cfg.num_classes`` outputs and load ``cfg.checkpoint`` into it.

    Returns the teacher in ``eval()`` mode with gradients off. Raises
    :class:`ConfigError` when the file's sha256 differs from ``cfg.sha256`` (if
    set), and ``ValueError`` (a :class:`~rcfast.train.errors.CheckpointError`
    for the file itself) naming the teacher when the file is missing or not a
    usable checkpoint (truncated, code-carrying, failing its content hash), or
    does not fit the architecture.
    """
    if cfg.sha256:
        teacher_file_sha256(cfg)
    path = check_checkpoint_file(cfg.checkpoint, what=f"teacher {cfg.name!r}: checkpoint")
    try:
        model = build_classifier(cfg.builder, cfg.num_classes, **cfg.builder_kwargs)
    except (ValueError, TypeError, ImportError) as exc:
        raise type(exc)(f"teacher {cfg.name!r}: cannot build {cfg.builder!r}: {exc}") from exc
    checkpoint = load_checkpoint(path, what=f"teacher {cfg.name!r}: checkpoint")
    try:
        state = extract_model_state(checkpoint)
    except ValueError as exc:
        raise ValueError(f"teacher {cfg.name!r}: {path} holds no model weights: {exc}") from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(
            f"teacher {cfg.name!r}: checkpoint {path} does not fit builder {cfg.builder!r} with "
            f"num_classes={cfg.num_classes} and builder_kwargs={cfg.builder_kwargs}: {' '.join(str(exc).split())}"
        ) from exc
    return model.to(device).eval().requires_grad_(False)


@dataclass
class TeacherRequest:
    """What one step needs from the teachers on one data stream.

    ``teachers``: whose logits, packed side by side in this order;
    ``layers``: ``{teacher: (layer, ...)}`` intermediate outputs to capture;
    ``stream``/``step``: where the images come from; ``position``: the
    batch's ``(epoch, batch index in the epoch)`` in its stream when the
    dataset reports it (with the dataset's ``epoch_indices(epoch)`` it names
    the samples -- what a cache of teacher outputs is keyed on);
    ``images``: the batch on the training device.
    """

    stream: str
    step: int
    images: torch.Tensor
    teachers: tuple[str, ...]
    layers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    position: tuple[int, int] | None = None


@dataclass
class TeacherOutputs:
    """``logits``: ``[B, sum(C_t)]`` in the request's teacher order (no gradient);
    ``layers``: ``{(teacher, layer): tensor}`` (no gradient)."""

    logits: torch.Tensor
    layers: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)


class TeacherSource:
    """Where a run's teacher outputs come from (the interface the trainer uses).

    Subclasses set ``num_classes`` (``{teacher: C_t}``, in a fixed order) and
    ``models`` (``{teacher: nn.Module}`` for layer hooks and shape probes, or
    ``None`` when there are none, e.g. a logit cache), and implement
    :meth:`__call__`. :meth:`to` moves whatever lives on a device.
    """

    num_classes: dict[str, int]
    models: Mapping[str, nn.Module] | None = None

    def __call__(self, request: TeacherRequest) -> TeacherOutputs:
        raise NotImplementedError

    def to(self, device) -> "TeacherSource":
        return self


def _num_classes(name: str, module: nn.Module) -> int:
    last = None
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            last = sub
    if last is None:
        raise ValueError(f"teacher {name!r} has no nn.Linear classifier to read its number of classes from; "
                         "pass num_classes={teacher: C}")
    return int(last.out_features)


class OnlineTeachers(TeacherSource):
    """Teacher models run on every step's images (in ``eval()``, ``inference_mode``, the run's autocast).

    Args:
        teachers: ``{name: module}``; each maps images to ``[B, C_t]`` logits.
        num_classes: ``{name: C_t}`` (default: the ``out_features`` of each
            model's last ``nn.Linear``); checked against the logits every step.
        autocast: a zero-argument callable returning the autocast context
            (default ``None``: the trainer's, set by the ``Consolidator``).
    """

    def __init__(self, teachers: Mapping[str, nn.Module], num_classes: Mapping[str, int] | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> None:
        if not isinstance(teachers, Mapping):
            raise TypeError(f"teachers must be a {{name: nn.Module}} mapping, got {type(teachers).__name__}")
        for name, module in teachers.items():
            if not isinstance(module, nn.Module):
                raise TypeError(f"teacher {name!r} must be an nn.Module, got {type(module).__name__}")
        self.models = dict(teachers)
        if num_classes is None:
            self.num_classes = {name: _num_classes(name, m) for name, m in self.models.items()}
        else:
            if set(num_classes) != set(self.models):
                raise ValueError(f"num_classes names {sorted(num_classes)} differ from the teachers "
                                 f"{sorted(self.models)}")
            self.num_classes = {name: int(num_classes[name]) for name in self.models}
        self.autocast = autocast
        self._buffers: dict[tuple, torch.Tensor] = {}
        for module in self.models.values():
            module.eval().requires_grad_(False)

    def to(self, device) -> "OnlineTeachers":
        self.models = {name: m.to(device) for name, m in self.models.items()}
        self._buffers.clear()
        return self

    def _packed_buffer(self, request: TeacherRequest, like: torch.Tensor) -> torch.Tensor:
        # One buffer per (stream, teachers): two streams' logits can be alive in the same step.
        key = (request.stream, request.teachers)
        batch = request.images.shape[0]
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < batch or buf.dtype != like.dtype or buf.device != like.device:
            # Allocated outside inference mode so the buffer is a normal tensor the
            # loss may keep for backward; its rows are overwritten every step.
            with torch.inference_mode(False):
                buf = torch.empty(batch, sum(self.num_classes[t] for t in request.teachers), dtype=like.dtype,
                                  device=like.device)
            self._buffers[key] = buf
        return buf[:batch]

    def __call__(self, request: TeacherRequest) -> TeacherOutputs:
        """Packed logits of ``request.teachers`` for ``request.images`` (a view of a reused buffer)."""
        images = request.images
        packed, start, layers = None, 0, {}
        autocast = self.autocast or contextlib.nullcontext
        with torch.inference_mode(), autocast():
            for name in request.teachers:
                size = self.num_classes[name]
                wanted = request.layers.get(name, ())
                with contextlib.ExitStack() as stack:
                    captured = (stack.enter_context(LayerCapture(self.models[name], wanted, f"teacher {name!r}"))
                                if wanted else {})
                    logits = self.models[name](images)
                if logits.dim() != 2 or logits.shape[0] != images.shape[0] or logits.shape[1] != size:
                    raise ValueError(f"teacher {name!r} produced logits of shape {tuple(logits.shape)}, "
                                     f"expected [{images.shape[0]}, {size}] ({size} classes)")
                if packed is None:
                    packed = self._packed_buffer(request, logits)
                packed[:, start:start + size].copy_(logits)
                start += size
                for layer in wanted:
                    layers[(name, layer)] = captured[layer]
        # Inference tensors cannot be saved for backward; terms may multiply by these.
        layers = {key: value.clone() for key, value in layers.items()}
        return TeacherOutputs(packed, layers)
