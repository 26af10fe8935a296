"""Resuming a run: which checkpoint to continue from, and whether the config still describes that run.

A run continues from its newest usable checkpoint (``train.resume: auto``) or
from a named one. A newer checkpoint that does not load or fails its content
hash is skipped with a warning naming it and the one used instead.

A resume continues *the same run*. The settings below may change between the
interrupted run and its continuation -- how long it runs, how it logs and
checkpoints, where it lives, how many threads it uses; the
remaining steps follow the new values (a longer ``max_steps`` also stretches
the cosine schedule from the current step on):

    train.max_steps, train.log_every, train.checkpoint_every, train.keep_checkpoints,
    train.progress, train.resume, train.out_dir, train.allow_config_change,
    train.dist_timeout_s, train.num_threads, data.num_threads

Any other difference -- a learning rate, a temperature, a teacher, a data
source, a teacher checkpoint file whose bytes changed -- is refused with a
:class:`~rcfast.train.config.ConfigError` listing every differing field,
unless ``train.allow_config_change: true`` (``rcfast consolidate
--allow-config-change``): then the run continues with the new settings, and
the change is recorded (``config_changes`` in later checkpoints and
``final.pt``; the config that was replaced is kept as
``config.before_step_<N>.yaml``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from rcfast.train.checkpoint import list_checkpoints, load_checkpoint, newest_loadable_checkpoint
from rcfast.train.config import ConfigError, normalized_config_dict
from rcfast.train.errors import CheckpointError

__all__ = ["RESUMABLE_CHANGES", "ResumePoint", "find_resume_point", "config_changes", "check_resume",
           "check_trainer_checkpoint"]

RESUMABLE_CHANGES = frozenset({
    "train.max_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.progress",
    "train.resume", "train.out_dir", "train.allow_config_change", "train.dist_timeout_s", "train.num_threads",
    "data.num_threads",
})
"""Config fields a resumed run may change: run length, logging, checkpointing, location, threads."""

ABSENT = "<absent>"
"""How a field present on one side only shows in a change."""


@dataclass
class ResumePoint:
    """A checkpoint a run continues from: its ``path``, loaded ``state`` and the newer ones ``skipped``."""

    path: Path
    state: dict
    skipped: list = field(default_factory=list)

    @property
    def step(self) -> int:
        return int(self.state["step"])


def find_resume_point(resume: str | None, checkpoint_dir: str | Path, check=None) -> ResumePoint | None:
    """The checkpoint ``train.resume`` asks for, loaded and verified (``None``: start fresh).

    ``"auto"``: the newest usable checkpoint in ``checkpoint_dir`` (newer
    unusable ones are skipped with a warning naming both); ``"none"``/``""``:
    none; anything else is a checkpoint file, which must be usable.
    ``check(state)`` raises :class:`CheckpointError` for a file that is not
    this kind of checkpoint.

    A run never mixes its checkpoints with another's: starting afresh
    (``"none"``) in a folder that holds checkpoints, or resuming a named
    checkpoint older than ones already there, is a :class:`ConfigError` (their
    pruning would delete the new run's checkpoints and keep the old ones).
    """
    existing = list_checkpoints(checkpoint_dir)
    if resume in ("none", "", None):
        if existing:
            raise ConfigError(
                f"train.resume is none, but {checkpoint_dir} already holds checkpoints of a run (up to step "
                f"{existing[-1][0]}): use another train.out_dir, move those checkpoints away, or resume them "
                "(train.resume: auto)")
        return None
    if resume == "auto":
        path, state, skipped = newest_loadable_checkpoint(checkpoint_dir, check)
        if path is None:
            return None
        for bad, reason in skipped:
            warnings.warn(f"{reason}; resuming from {path} instead", RuntimeWarning, stacklevel=2)
        return ResumePoint(Path(path), state, skipped)
    path = Path(resume)
    state = load_checkpoint(path, what="train.resume checkpoint")
    if check is not None:
        try:
            check(state)
        except CheckpointError as exc:
            raise CheckpointError(f"train.resume checkpoint {path}: {exc}") from exc
    point = ResumePoint(path, state)
    newer = [p.name for step, p in existing if step > point.step]
    if newer:
        raise ConfigError(
            f"train.resume names {path} (step {point.step}), but {checkpoint_dir} holds newer checkpoints {newer}: "
            "to go back to an earlier step, move those away first (or resume into another train.out_dir)")
    return point


def _flatten(value, prefix: str, out: dict) -> dict:
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            _flatten(sub, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list) and value:
        for i, sub in enumerate(value):
            _flatten(sub, f"{prefix}[{i}]", out)
    else:
        out[prefix] = value
    return out


def config_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """``[(field, old value, new value)]`` of every leaf that differs between two config dicts.

    Both are first completed with the config's defaults, so a field a newer
    rcfast added (at its default) is no change. A field absent on one side
    shows the value ``<absent>``.
    """
    a, b = _flatten(normalized_config_dict(old), "", {}), _flatten(normalized_config_dict(new), "", {})
    changes = []
    for key in list(a) + [k for k in b if k not in a]:
        before, after = a.get(key, ABSENT), b.get(key, ABSENT)
        if before != after or type(before) is not type(after):
            if isinstance(before, (int, float)) and isinstance(after, (int, float)) and before == after \
                    and not isinstance(before, bool) and not isinstance(after, bool):
                continue  # 1 and 1.0 are the same setting
            changes.append((key, before, after))
    return changes


def _shown(value) -> str:
    if value == ABSENT:
        return ABSENT
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume(point: ResumePoint, config: dict | None, max_steps: int, allow_change: bool,
                 teacher_files: dict | None = None) -> list[tuple[str, object, object]]:
    """Check that ``point`` can be continued by a run with ``config``; return the changes that apply.

    Raises :class:`ConfigError` when ``max_steps`` is below the checkpoint's
    step, or when the config (or a teacher file's sha256) differs in a field
    outside :data:`RESUMABLE_CHANGES` and ``allow_change`` is false.
    """
    step = point.step
    if max_steps < step:
        raise ConfigError(
            f"train.max_steps={max_steps} is below the step of the checkpoint it resumes, {point.path} (step {step}): "
            f"the run already trained {step} steps. Set train.max_steps >= {step} to continue it, or start a new run "
            "(another train.out_dir, or train.resume: none)")
    changes = []
    saved = point.state.get("config")
    if isinstance(saved, dict) and isinstance(config, dict):
        changes += config_changes(saved, config)
    saved_files = point.state.get("teacher_files")
    if isinstance(saved_files, dict) and teacher_files is not None:
        for name in sorted(set(saved_files) | set(teacher_files)):
            before, after = saved_files.get(name, ABSENT), teacher_files.get(name, ABSENT)
            if before != after:
                changes.append((f"teacher {name!r} checkpoint file sha256", before, after))
    refused = [c for c in changes if c[0] not in RESUMABLE_CHANGES]
    if refused and not allow_change:
        listed = "; ".join(f"{key}: {_shown(a)} -> {_shown(b)}" for key, a, b in refused)
        raise ConfigError(
            f"the config differs from the run it would resume ({point.path}, step {step}) in {len(refused)} "
            f"field(s): {listed}. Only run-length, logging, checkpoint, location and thread settings may change "
            f"when resuming ({', '.join(sorted(RESUMABLE_CHANGES))}). Start a new run (another train.out_dir, or "
            "train.resume: none), or continue this one with the new settings: train.allow_config_change: true "
            "(rcfast consolidate --allow-config-change)")
    return changes


def check_trainer_checkpoint(expected_format: str):
    """A ``check(state)`` for :func:`find_resume_point`: the state must be a trainer checkpoint of this format."""
    def check(state) -> None:
        fmt = state.get("format") if isinstance(state, dict) else None
        if fmt != expected_format:
            raise CheckpointError(f"not an rcfast trainer checkpoint of format {expected_format!r} (format {fmt!r})")
    return check
