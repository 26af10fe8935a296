"""Objective terms: the ``Term`` base class, the registry, and what a term is bound against.

A term is an ``nn.Module`` with three methods:

- ``__init__(**options)``: its YAML options (everything in its objective entry
  except ``term``, ``weight`` and ``name``), checked here; bad values raise
  ``ValueError``/``TypeError`` and become a :class:`ConfigError` naming the entry.
- ``bind(setup)``: called once, before training, with a :class:`TermSetup`.
  The term checks its options against the run (heads, teachers, data streams),
  declares every input it will read with ``setup.need(key)``, and creates its
  trainable parameters or buffers if it has any (they are then moved to the
  device, given to the optimiser, synchronised by DDP and checkpointed).
- ``forward(step)``: the unweighted scalar loss of one step, reading
  ``step[key]`` for the keys it declared. The objective multiplies it by the
  entry's ``weight``.

``parts(step)`` may return named sub-losses for logging (called on logging
steps only). Terms are registered by name with :func:`register_term`, which is
how YAML ``objective: [{term: <name>, ...}]`` entries find them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from rcfast.train.config import PROXY_STREAM, ConfigError
from rcfast.train.hooks import LayerCapture, unknown_layer_message
from rcfast.train.objectives.inputs import (InputKey, Labels, StepInputs, StudentHeadLinear, StudentLayer,
                                            StudentLogits, TeacherLayer, TeacherLogits)

__all__ = ["Term", "TermSetup", "RunLayout", "StreamInfo", "ModelsUnavailable", "register_term", "term_class",
           "available_terms"]

_TERMS: dict[str, type["Term"]] = {}


class ModelsUnavailable(Exception):
    """Raised by :meth:`TermSetup.probe` when the run is checked from its config alone (no models yet)."""


class Term(nn.Module):
    """One loss term of an objective (subclass it and register it with :func:`register_term`)."""

    #: the registry name, set by :func:`register_term`
    term_type: str = ""

    def bind(self, setup: "TermSetup") -> None:
        """Check the options against the run, declare inputs (``setup.need``), build parameters."""
        raise NotImplementedError(f"{type(self).__name__} must implement bind(setup)")

    def forward(self, step: StepInputs) -> torch.Tensor:
        """The unweighted scalar loss of this step."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(step)")

    def parts(self, step: StepInputs) -> dict[str, torch.Tensor]:
        """Named sub-losses for the logs (logging steps only); none by default."""
        return {}


def register_term(name: str) -> Callable[[type[Term]], type[Term]]:
    """Class decorator: make ``cls`` the objective term ``name`` (``objective: [{term: name}]``)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a term name must be an identifier-like string, got {name!r}")

    def _register(cls: type[Term]) -> type[Term]:
        if not (isinstance(cls, type) and issubclass(cls, Term)):
            raise TypeError(f"@register_term({name!r}) decorates Term subclasses, got {cls!r}")
        if name in _TERMS and _TERMS[name] is not cls:
            raise ValueError(f"an objective term named {name!r} is already registered ({_TERMS[name].__qualname__})")
        cls.term_type = name
        _TERMS[name] = cls
        return cls

    return _register


def available_terms() -> list[str]:
    """Registered term names."""
    return sorted(_TERMS)


def term_class(name: str) -> type[Term]:
    """The class registered as ``name``; a :class:`ConfigError` listing the registered names otherwise."""
    if name not in _TERMS:
        raise ConfigError(f"unknown objective term {name!r}; registered terms: {available_terms()}")
    return _TERMS[name]


@dataclass
class StreamInfo:
    """A data stream of the run: does it yield labels, and over how many classes (if known)."""

    labels: bool
    num_classes: int | None = None


@dataclass
class RunLayout:
    """What an objective is bound against.

    ``student`` is ``None`` when a run is checked from its config alone (before
    any model is built): layer names and shapes are then checked later, when the
    trainer binds the objective to the real models. ``teacher_models`` is
    ``None`` when the teacher source has no models (e.g. a logit cache).
    """

    heads: dict[str, int]
    teachers: dict[str, int]
    streams: dict[str, StreamInfo]
    loss_backend: str = "auto"
    student: nn.Module | None = None
    teacher_models: Mapping[str, nn.Module] | None = None
    example_images: torch.Tensor | None = None

    @property
    def models_known(self) -> bool:
        return self.student is not None


class TermSetup:
    """The run as one term sees it at bind time; ``need(key)`` declares (and checks) an input.

    Attributes:
        name: the term's name in this objective (used in every error message).
        heads: ``{head: num_classes}`` of the student, in packed order.
        teachers: ``{teacher: num_classes}``.
        streams: ``{stream: StreamInfo}``; ``"proxy"`` is the unlabeled (or
            labeled) proxy data, other streams are labeled tasks by name.
        loss_backend: the run's ``train.loss_backend`` for rcfast's fused losses.
    """

    def __init__(self, layout: RunLayout, name: str) -> None:
        self.layout = layout
        self.name = name
        self.declared: list[InputKey] = []

    # -- the run's layout
    @property
    def heads(self) -> dict[str, int]:
        return dict(self.layout.heads)

    @property
    def teachers(self) -> dict[str, int]:
        return dict(self.layout.teachers)

    @property
    def streams(self) -> dict[str, StreamInfo]:
        return dict(self.layout.streams)

    @property
    def loss_backend(self) -> str:
        return self.layout.loss_backend

    def error(self, message: str) -> ConfigError:
        """A :class:`ConfigError` naming this term: ``raise setup.error("...")``."""
        return ConfigError(f"objective term {self.name!r}: {message}")

    # -- checked look-ups of option values
    def head(self, head: str, option: str = "head") -> str:
        """``head`` if the student has it; an error naming ``option`` and the heads otherwise."""
        if head not in self.layout.heads:
            raise self.error(f"{option}: the student has no head {head!r}; its heads: {list(self.layout.heads)}")
        return head

    def teacher(self, teacher: str, option: str = "teacher") -> str:
        """``teacher`` if the run has it; an error naming ``option`` and the teachers otherwise."""
        if teacher not in self.layout.teachers:
            raise self.error(f"{option}: there is no teacher {teacher!r}; the run's teachers: "
                             f"{list(self.layout.teachers)}")
        return teacher

    def stream(self, stream: str | None, option: str = "data") -> str:
        """The data stream ``stream`` (default: ``"proxy"``) if the run has it."""
        if stream is None:
            stream = PROXY_STREAM
        if stream not in self.layout.streams:
            available = list(self.layout.streams)
            where = ("the run has no proxy data (data.source)" if stream == PROXY_STREAM
                     else f"there is no data stream {stream!r}")
            raise self.error(f"{option}: {where}; the run's streams: {available} (the proxy images are "
                             "'proxy', each labeled task is its name in tasks)")
        return stream

    # -- declaring inputs
    def need(self, key: InputKey) -> InputKey:
        """Declare that this term reads ``step[key]``; check now that the run can provide it."""
        if not isinstance(key, InputKey):
            raise TypeError(f"need() takes an input key (Images, Labels, StudentLogits, ...), got {key!r}")
        self.stream(key.stream, option=f"{type(key).__name__}.stream")
        if isinstance(key, Labels) and not self.layout.streams[key.stream].labels:
            hint = "set data.labels: true" if key.stream == PROXY_STREAM else "its dataset must yield labels"
            raise self.error(f"needs labels from the data stream {key.stream!r}, which yields none ({hint})")
        if isinstance(key, (StudentLogits, StudentHeadLinear)):
            if not key.heads:
                raise self.error(f"{type(key).__name__} needs at least one head")
            for head in key.heads:
                self.head(head, option="heads")
            if len(set(key.heads)) != len(key.heads):
                raise self.error(f"a head appears twice in {list(key.heads)}")
        if isinstance(key, TeacherLogits):
            if not key.teachers:
                raise self.error("TeacherLogits needs at least one teacher")
            for teacher in key.teachers:
                self.teacher(teacher, option="teachers")
            if len(set(key.teachers)) != len(key.teachers):
                raise self.error(f"a teacher appears twice in {list(key.teachers)}")
        if isinstance(key, StudentLayer) and self.layout.models_known:
            self._check_layer("the student", self.layout.student, key.layer)
        if isinstance(key, TeacherLayer):
            self.teacher(key.teacher)
            if self.layout.models_known:
                models = self.layout.teacher_models
                if models is None:
                    raise self.error(f"needs features of teacher {key.teacher!r}'s layer {key.layer!r}, but the "
                                     "run's teacher source has no models (a logit cache provides logits only)")
                self._check_layer(f"teacher {key.teacher!r}", models[key.teacher], key.layer)
        if key not in self.declared:
            self.declared.append(key)
        return key

    def _check_layer(self, owner: str, model: nn.Module, layer: str) -> None:
        if layer not in dict(model.named_modules()) or not layer:
            raise self.error(unknown_layer_message(owner, model, layer))

    # -- shapes, for terms that build parameters
    def probe(self, key: StudentLayer | TeacherLayer | StudentLogits) -> torch.Size:
        """Declare ``key`` (as :meth:`need`) and return the shape of its tensor for the run's example images.

        Runs the model once in ``eval()`` mode without gradients (the training
        mode is restored). Raises :class:`ModelsUnavailable` while the run is
        checked from its config alone; the trainer binds again with models.
        """
        self.need(key)
        if not self.layout.models_known:
            raise ModelsUnavailable(key)
        images = self.layout.example_images
        if images is None:
            raise self.error("needs example images to measure layer shapes: pass example_images= to the "
                             "Consolidator (Consolidator.from_config does)")
        if isinstance(key, TeacherLayer):
            if self.layout.teacher_models is None:
                raise self.error("cannot probe a teacher layer without teacher models")
            model, layer = self.layout.teacher_models[key.teacher], key.layer
        elif isinstance(key, StudentLayer):
            model, layer = self.layout.student, key.layer
        elif isinstance(key, StudentLogits):
            model, layer = self.layout.student, ""
        else:
            raise TypeError(f"probe() takes StudentLayer, TeacherLayer or StudentLogits, got {key!r}")
        param = next(model.parameters(), None)
        device = param.device if param is not None else images.device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), contextlib.ExitStack() as stack:
                if layer:
                    outputs = stack.enter_context(LayerCapture(model, [layer], owner=self.name))
                    model(images.to(device))
                    shape = outputs[layer].shape
                else:
                    out = model(images.to(device))
                    width = sum(self.layout.heads[h] for h in key.heads)
                    shape = torch.Size([out.shape[0], width])
        finally:
            model.train(was_training)
        return shape
