"""``student.init_from``: start a student's backbone from a trained classifier or backbone.

The checkpoint may be an rcfast checkpoint or ``final.pt`` (``{"model": ...}``
with ``backbone.*`` and ``heads.*`` keys), a classifier's state_dict (a
``build_classifier`` model, a ``torchvision:``/``timm:`` model with its
classifier), or a backbone's state_dict. The classifier layer (``heads.*``, or
the ``torchvision:``/``timm:`` head the backbone was built without) is dropped;
every other key must match the backbone exactly, or a :class:`ConfigError`
lists the missing, unexpected and mis-shaped keys. Loaded with
``torch.load(weights_only=True)`` (a checkpoint is data, never code), its
content hash verified when rcfast wrote it.
"""
from __future__ import annotations

from pathlib import Path

from rcfast.models import MultiHeadStudent
from rcfast.train.checkpoint import load_checkpoint
from rcfast.train.config import ConfigError
from rcfast.train.errors import CheckpointError
from rcfast.train.teachers import extract_model_state

__all__ = ["init_student_from"]

_STUDENT_HEADS = "heads"


def _listed(keys: list[str], limit: int = 20) -> str:
    return str(keys if len(keys) <= limit else keys[:limit] + [f"... ({len(keys) - limit} more)"])


def backbone_state(state: dict, classifier_names: tuple[str, ...]) -> tuple[dict, list[str]]:
    """``(backbone keys -> tensors, dropped classifier keys)`` of a loaded state_dict."""
    rcfast_form = any(k.startswith("backbone.") for k in state) and all(
        k.startswith(("backbone.", f"{_STUDENT_HEADS}.")) for k in state)
    if rcfast_form:
        body = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        return body, [k for k in state if k.startswith(f"{_STUDENT_HEADS}.")]
    prefixes = tuple(f"{name}." for name in classifier_names if name)
    dropped = [k for k in state if prefixes and k.startswith(prefixes)]
    return {k: v for k, v in state.items() if k not in dropped}, dropped


def init_student_from(student: MultiHeadStudent, path: str | Path) -> list[str]:
    """Load ``path`` into ``student.backbone`` (heads untouched); return the dropped classifier keys."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"student.init_from: checkpoint file {path} does not exist")
    try:
        state = extract_model_state(load_checkpoint(path, what="student.init_from: checkpoint"))
    except (CheckpointError, ValueError) as exc:
        raise ConfigError(str(exc) if isinstance(exc, CheckpointError)
                          else f"student.init_from: {path} holds no model weights: {exc}") from exc
    classifier_names = (_STUDENT_HEADS, getattr(student.backbone, "classifier_name", None))
    body, dropped = backbone_state(state, classifier_names)
    expected = student.backbone.state_dict()
    missing = sorted(k for k in expected if k not in body)
    unexpected = sorted(k for k in body if k not in expected)
    mis_shaped = sorted(f"{k}: {tuple(body[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                        if k in body and body[k].shape != v.shape)
    if missing or unexpected or mis_shaped:
        raise ConfigError(
            f"student.init_from: {path} does not fit the student's backbone ({type(student.backbone).__name__}; "
            f"classifier keys dropped: {_listed(dropped)}): missing keys {_listed(missing)}, unexpected keys "
            f"{_listed(unexpected)}, shape mismatches (checkpoint vs backbone) {_listed(mis_shaped)}")
    student.backbone.load_state_dict(body, strict=True)
    return dropped
