"""Reading a trained backbone back from a checkpoint (what ``rcfast eval`` evaluates).

The file is untrusted data, and so is the config stored inside it:

- it is loaded with ``torch.load(weights_only=True)`` and its content hash is
  verified when rcfast wrote it (:func:`rcfast.train.checkpoint.load_checkpoint`);
- the backbone name and kwargs taken from its config must pass
  :func:`rcfast.models.registry.untrusted_kwargs_problem` (no file paths, URLs
  or pretrained-weight switches reach a third-party builder); a user who
  trusts them passes them explicitly instead;
- the architecture is first built on the ``meta`` device and its parameter
  shapes compared with the file's, so a config asking for a gigantic model
  fails before any memory is allocated;
- the image size it gives must be a sane integer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rcfast.models import build_model
from rcfast.models.registry import untrusted_kwargs_problem
from rcfast.train.checkpoint import load_checkpoint
from rcfast.train.config import MAX_IMAGE_SIZE, check_plain_data
from rcfast.train.teachers import extract_model_state

__all__ = ["TrainedBackbone", "load_trained_backbone", "MAX_STORED_IMAGE_SIZE"]

MAX_STORED_IMAGE_SIZE = MAX_IMAGE_SIZE
"""The largest ``data.image_size`` taken from a checkpoint's config (a config's own limit)."""


@dataclass
class TrainedBackbone:
    """A backbone with its trained weights, and how it was described."""

    backbone: nn.Module
    name: str
    kwargs: dict
    image_size: int | None
    from_stored_config: bool


def _stored_config(checkpoint, path: Path) -> dict | None:
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: its stored config is a {type(config).__name__}, not a mapping")
    check_plain_data(config, f"{path}'s stored config")
    return config


def _stored_backbone(config: dict, path: Path) -> tuple[str, dict]:
    student = config.get("student")
    name = student.get("backbone") if isinstance(student, dict) else None
    kwargs = student.get("backbone_kwargs", {}) if isinstance(student, dict) else None
    problem = untrusted_kwargs_problem(name, kwargs)
    if problem is not None:
        raise ValueError(
            f"{path}: its stored config asks for backbone {name!r} with {problem}. A config read from a checkpoint "
            "is untrusted: rcfast passes on only plain architecture settings from it. If you trust this file, give "
            "the backbone yourself (rcfast eval --backbone NAME --backbone-kwargs JSON)")
    return name, dict(kwargs)


def _stored_image_size(config: dict | None, path: Path) -> int | None:
    data = config.get("data") if isinstance(config, dict) else None
    size = data.get("image_size") if isinstance(data, dict) else None
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_STORED_IMAGE_SIZE:
        raise ValueError(f"{path}: its stored config has data.image_size={size!r}, not an integer in "
                         f"[1, {MAX_STORED_IMAGE_SIZE}]; pass --image-size")
    return size


def _backbone_weights(state: dict) -> dict:
    if any(k.startswith("backbone.") for k in state):
        return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def _check_shapes(name: str, kwargs: dict, state: dict, path: Path) -> None:
    """Build the architecture without memory (``meta``) and compare its tensors with the file's."""
    with torch.device("meta"):
        expected = build_model(name, **kwargs).state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    mis_shaped = sorted(f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                        if k in state and state[k].shape != v.shape)
    if missing or unexpected or mis_shaped:
        def listed(keys):
            return keys if len(keys) <= 8 else keys[:8] + [f"... ({len(keys) - 8} more)"]
        raise ValueError(f"{path} does not fit backbone {name!r} with {kwargs}: missing keys {listed(missing)}, "
                         f"unexpected keys {listed(unexpected)}, shape mismatches (file vs model) {listed(mis_shaped)}")


def load_trained_backbone(path: str | Path, backbone: str | None = None, backbone_kwargs: dict | None = None,
                          image_size: int | None = None) -> TrainedBackbone:
    """The backbone stored in ``path`` (``final.pt``, a trainer checkpoint, or a backbone/student state_dict).

    ``backbone``/``backbone_kwargs`` (trusted: from the user) override the
    checkpoint's stored config; without them the stored config must name a
    backbone with safe kwargs. ``image_size`` likewise overrides the stored
    ``data.image_size``. Raises :class:`~rcfast.train.errors.CheckpointError`
    (a ``ValueError``) for an unusable file and ``ValueError`` for an unsafe or
    ill-fitting description, each naming ``path``.
    """
    path = Path(path)
    checkpoint = load_checkpoint(path, what="--checkpoint")
    try:
        state = _backbone_weights(extract_model_state(checkpoint))
    except ValueError as exc:
        raise ValueError(f"{path} holds no model weights: {exc}") from exc
    config = _stored_config(checkpoint, path)
    if backbone is not None:
        name, kwargs, stored = backbone, dict(backbone_kwargs or {}), False
    elif config is not None:
        name, kwargs = _stored_backbone(config, path)
        stored = True
    else:
        raise ValueError(f"{path} holds no run config: pass --backbone (and --backbone-kwargs)")
    _check_shapes(name, kwargs, state, path)
    model = build_model(name, **kwargs)
    model.load_state_dict(state)
    if image_size is None:
        image_size = _stored_image_size(config, path)
    return TrainedBackbone(model, name, kwargs, image_size, stored)
