"""``iekd_inherit`` and ``iekd_explore``: IE-KD's feature terms (arXiv 2107.00181).

The student's feature map at ``student_layer`` is split by channels
(:class:`~rcfast.losses.iekd.ChannelSplit`); ``iekd_inherit`` encodes the
inheritance part into a factor pulled towards the teacher's factor,
``iekd_explore`` encodes the exploration part into a factor pushed away from it.
The teacher's factor is the frozen encoder of an auto-encoder pretrained by a
``factor_reconstruction`` run. The task loss is other terms of the objective::

    objective:
      - {term: cross_entropy}
      - {term: multihead_kd}
      - {term: iekd_inherit, weight: 1.0, autoencoder: runs/teacher_ae, student_layer: backbone.body.11}
      - {term: iekd_explore, weight: 1.0, autoencoder: runs/teacher_ae, student_layer: backbone.body.11,
         exploration: cka}

Options of both terms:

- ``autoencoder``: the ``factor_reconstruction`` run (its ``out_dir``, whose
  latest checkpoint is read) or one of its checkpoint files; loaded with
  ``weights_only=True``.
- ``autoencoder_term``: that run's term name (default ``factor_reconstruction``).
- ``student_layer``: the student's layer giving a feature map ``[B, C, H, W]``.
- ``teacher``, ``teacher_layer``: default to those the auto-encoder was trained
  on (read from the run's stored config); giving others is an error.
- ``split`` (``natural``/``random``), ``seed``, ``inherit_channels``: the
  channel split; both terms of a run must give the same ones (checked).
- ``warmup_steps``: the term's weight ramps linearly from ``1/warmup_steps`` of
  the entry's ``weight`` at the first step to the full weight (default 0: none).
- ``data``: the data stream (default ``proxy``).

``iekd_explore`` also takes ``exploration``: ``l1`` (default), ``cos`` or ``cka``.

Each term owns its student-side encoder (trained with the student) and a frozen
copy of the teacher's encoder; both terms encode the teacher's features, a
small convolution each step. The split is saved in the checkpoints.
"""
from __future__ import annotations

from pathlib import Path

import torch

from rcfast.losses.iekd import EXPLORATION_KINDS, SPLIT_MODES, ChannelSplit, exploration_loss, inheritance_loss
from rcfast.models.autoencoder import ConvCoder, FactorAutoEncoder
from rcfast.train.checkpoint import latest_checkpoint, load_checkpoint
from rcfast.train.objectives.base import Term, TermSetup, register_term
from rcfast.train.objectives.factor_reconstruction import feature_map_shape
from rcfast.train.objectives.inputs import StepInputs, StudentLayer, TeacherLayer
from rcfast.train.objectives.options import check_warmup_steps, warmup_factor

__all__ = ["IEKDInherit", "IEKDExplore", "load_teacher_autoencoder"]

_SPLITS_SEEN = "_iekd_splits"  # attribute of the RunLayout being bound: the split of each IE-KD term, per layer


def _checkpoint_file(autoencoder: str) -> Path:
    path = Path(autoencoder)
    if path.is_dir():
        found = latest_checkpoint(path / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"autoencoder: {path} holds no checkpoints/checkpoint_*.pt; point it at a "
                                    "factor_reconstruction run's out_dir or checkpoint file")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"autoencoder: {path} does not exist (a factor_reconstruction run's out_dir or "
                                "checkpoint file)")
    return path


def load_teacher_autoencoder(autoencoder: str, term: str = "factor_reconstruction"
                             ) -> tuple[FactorAutoEncoder, dict]:
    """The auto-encoder trained by term ``term`` of a run, and ``{"teacher", "layer"}`` it was trained on.

    ``autoencoder`` is the run's ``out_dir`` (its latest checkpoint) or a
    checkpoint file. The teacher and layer come from the run config stored in
    the checkpoint (``{}`` entries when it has none).
    """
    path = _checkpoint_file(autoencoder)
    checkpoint = load_checkpoint(path)
    objective = checkpoint.get("objective") if isinstance(checkpoint, dict) else None
    if not isinstance(objective, dict):
        raise ValueError(f"autoencoder: {path} is not an rcfast trainer checkpoint with objective terms")
    prefix = f"terms.{term}.autoencoder."
    state = {k[len(prefix):]: v for k, v in objective.items() if k.startswith(prefix)}
    if not state:
        names = sorted({k.split(".")[1] for k in objective if k.startswith("terms.")})
        raise ValueError(f"autoencoder: {path} holds no auto-encoder of a term named {term!r}; terms with state "
                         f"there: {names} (set autoencoder_term)")
    stored = {}
    config = checkpoint.get("config") or {}
    for entry in config.get("objective") or []:
        if isinstance(entry, dict) and entry.get("name", entry.get("term")) == term:
            teachers = config.get("teachers") or []
            teacher = entry.get("teacher")
            if teacher is None and len(teachers) == 1 and isinstance(teachers[0], dict):
                teacher = teachers[0].get("name")
            # The stored config is data from a file: only strings are names.
            stored = {k: v for k, v in (("teacher", teacher), ("layer", entry.get("layer"))) if isinstance(v, str)}
    return FactorAutoEncoder.from_state_dict(state), stored


class _IEKDTerm(Term):
    """What both IE-KD terms share: the teacher's frozen encoder, the split, one student-side encoder."""

    #: which part of the split this term encodes: 0 inheritance, 1 exploration
    part_index: int

    def _options(self, autoencoder, student_layer, teacher, teacher_layer, autoencoder_term, split, seed,
                 inherit_channels, warmup_steps, data) -> None:
        for option, value in (("autoencoder", autoencoder), ("student_layer", student_layer),
                              ("autoencoder_term", autoencoder_term)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{option} must be a non-empty string, got {value!r}")
        for option, value in (("teacher", teacher), ("teacher_layer", teacher_layer)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{option} must be a non-empty string (or omitted), got {value!r}")
        if split not in SPLIT_MODES:
            raise ValueError(f"split must be one of {SPLIT_MODES}, got {split!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if inherit_channels is not None and (isinstance(inherit_channels, bool) or not isinstance(inherit_channels, int)
                                             or inherit_channels <= 0):
            raise ValueError(f"inherit_channels must be a positive int (or omitted), got {inherit_channels!r}")
        self.autoencoder_path, self.student_layer, self.autoencoder_term = autoencoder, student_layer, autoencoder_term
        self.teacher, self.teacher_layer = teacher, teacher_layer
        self.split_options = {"mode": split, "seed": seed, "inherit_channels": inherit_channels}
        self.warmup_steps = check_warmup_steps(warmup_steps)
        self.data = data

    def _stored(self, setup: TermSetup, option: str, given: str | None, stored: str | None) -> str:
        if given is not None and stored is not None and given != stored:
            raise setup.error(f"{option}: the auto-encoder in {self.autoencoder_path} was trained on {stored!r}, "
                              f"not {given!r}")
        if given is None and stored is None:
            raise setup.error(f"{option}: the auto-encoder's run config does not say it; set {option}")
        return given if given is not None else stored

    def _check_split_agrees(self, setup: TermSetup) -> None:
        # Inheritance and exploration must split the same channels the same way,
        # or the two parts would overlap. The terms of one objective are bound
        # against one RunLayout object, so the splits seen are noted on it.
        seen = vars(setup.layout).setdefault(_SPLITS_SEEN, {})
        key = (self.student_key.stream, self.student_layer)
        mine = dict(self.split_options)
        if key in seen and seen[key][1] != mine:
            other, theirs = seen[key]
            raise setup.error(f"split options {mine} differ from {theirs} of IE-KD term {other!r} on the same "
                              f"student layer {self.student_layer!r}: give both terms the same split, seed and "
                              "inherit_channels")
        seen.setdefault(key, (setup.name, mine))

    def bind(self, setup: TermSetup) -> None:
        stream = setup.stream(self.data)
        autoencoder, stored = load_teacher_autoencoder(self.autoencoder_path, self.autoencoder_term)
        teacher = setup.teacher(self._stored(setup, "teacher", self.teacher, stored.get("teacher")))
        teacher_layer = self._stored(setup, "teacher_layer", self.teacher_layer, stored.get("layer"))
        self.teacher_key = TeacherLayer(stream, teacher, teacher_layer)
        self.student_key = StudentLayer(stream, self.student_layer)
        self._check_split_agrees(setup)
        teacher_shape = feature_map_shape(setup, self.teacher_key, f"teacher {teacher!r}")
        student_shape = feature_map_shape(setup, self.student_key, "the student's")
        if teacher_shape[1] != autoencoder.in_channels:
            raise setup.error(f"teacher layer {teacher_layer!r} has {teacher_shape[1]} channels, but the "
                              f"auto-encoder encodes {autoencoder.in_channels}")
        if teacher_shape[2:] != student_shape[2:]:
            raise setup.error(f"factor shapes differ: the student layer {self.student_layer!r} gives "
                              f"{tuple(student_shape[2:])} maps, the teacher layer {teacher_layer!r} "
                              f"{tuple(teacher_shape[2:])}; pick layers of the same spatial size")
        try:
            self.split = ChannelSplit(student_shape[1], **self.split_options)
        except (TypeError, ValueError) as exc:
            raise setup.error(f"student_layer {self.student_layer!r}: {exc}") from exc
        part_channels = (self.split.inherit_channels, self.split.explore_channels)[self.part_index]
        self.encoder = ConvCoder(part_channels, autoencoder.factor_channels)
        self.teacher_autoencoder = autoencoder.freeze()

    def _unweighted(self, step: StepInputs) -> torch.Tensor:
        with torch.no_grad():
            teacher_factor = self.teacher_autoencoder.encode(step[self.teacher_key].float())
        part = self.split(step[self.student_key])[self.part_index]
        return self.factor_loss(self.encoder(part.float()), teacher_factor)

    def factor_loss(self, student_factor: torch.Tensor, teacher_factor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, step: StepInputs) -> torch.Tensor:
        unweighted = self._unweighted(step)
        factor = warmup_factor(step.step, self.warmup_steps)
        if factor < 1.0:  # kept for parts(): the loss before the ramp, without a second forward
            self._ramping = (step.step, unweighted.detach(), factor)
        return factor * unweighted

    def parts(self, step: StepInputs) -> dict[str, torch.Tensor]:
        """During the warm-up: the loss before the ramp and the ramp factor."""
        ramping = getattr(self, "_ramping", None)
        if ramping is None or ramping[0] != step.step:
            return {}
        return {"before_warmup": ramping[1], "warmup": ramping[1].new_tensor(ramping[2])}


@register_term("iekd_inherit")
class IEKDInherit(_IEKDTerm):
    """Inheritance: ``mean |n(s) - n(t)|`` between the inheritance part's factor and the teacher's."""

    part_index = 0

    def __init__(self, autoencoder: str, student_layer: str, teacher: str | None = None,
                 teacher_layer: str | None = None, autoencoder_term: str = "factor_reconstruction",
                 split: str = "natural", seed: int = 0, inherit_channels: int | None = None,
                 warmup_steps: int = 0, data: str | None = None) -> None:
        super().__init__()
        self._options(autoencoder, student_layer, teacher, teacher_layer, autoencoder_term, split, seed,
                      inherit_channels, warmup_steps, data)

    def factor_loss(self, student_factor: torch.Tensor, teacher_factor: torch.Tensor) -> torch.Tensor:
        return inheritance_loss(student_factor, teacher_factor)


@register_term("iekd_explore")
class IEKDExplore(_IEKDTerm):
    """Exploration: push the exploration part's factor away from the teacher's (``l1``, ``cos`` or ``cka``)."""

    part_index = 1

    def __init__(self, autoencoder: str, student_layer: str, exploration: str = "l1", teacher: str | None = None,
                 teacher_layer: str | None = None, autoencoder_term: str = "factor_reconstruction",
                 split: str = "natural", seed: int = 0, inherit_channels: int | None = None,
                 warmup_steps: int = 0, data: str | None = None) -> None:
        super().__init__()
        if exploration not in EXPLORATION_KINDS:
            raise ValueError(f"exploration must be one of {EXPLORATION_KINDS}, got {exploration!r}")
        self.exploration = exploration
        self._options(autoencoder, student_layer, teacher, teacher_layer, autoencoder_term, split, seed,
                      inherit_channels, warmup_steps, data)

    def factor_loss(self, student_factor: torch.Tensor, teacher_factor: torch.Tensor) -> torch.Tensor:
        return exploration_loss(student_factor, teacher_factor, self.exploration)
