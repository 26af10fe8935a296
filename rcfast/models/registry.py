"""Model registry: configs name architectures, this module builds them.

Names map to backbone builders (``"small_cnn"``, ``"resnet18"``, plus anything
added with :func:`register_model`). ``"torchvision:<name>"`` and
``"timm:<name>"`` build those libraries' models when they are importable; they
are optional, so asking for one without the library is a clear error.

Three things are built from a name:

- :func:`build_model`: a backbone, images -> ``[B, feature_dim]``, with a
  ``feature_dim`` attribute (and, for ``torchvision:``/``timm:`` models,
  ``classifier_name``: the classifier module the backbone does without).
- :func:`build_classifier`: a classifier, images -> ``[B, num_classes]`` (how
  teachers are built; a teacher checkpoint is that classifier's state_dict).
- :func:`build_student`: a :class:`MultiHeadStudent` on a named backbone.

:func:`classifier_backbone` recovers the feature extractor of a classifier, so
teachers' representations can be evaluated like students'.

A model name and kwargs read from a file rcfast did not get from its user (a
config stored inside a checkpoint) are untrusted: third-party builders open
files and download weights when asked to (timm's ``checkpoint_path``,
``pretrained_cfg_overlay``, ``pretrained=True`` -- some of them with
``torch.load(weights_only=False)``, i.e. code execution).
:func:`untrusted_kwargs_problem` says whether such kwargs are safe to pass on.
"""
from __future__ import annotations

import copy
import importlib
import inspect
from typing import Callable, Mapping

from torch import nn

from rcfast.models.backbones import resnet18_backbone, small_cnn
from rcfast.models.student import MultiHeadStudent

__all__ = ["register_model", "available_models", "build_model", "build_classifier",
           "build_student", "classifier_backbone", "untrusted_kwargs_problem", "UNTRUSTED_EXTERNAL_KWARGS"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_EXTERNAL_PREFIXES = ("torchvision:", "timm:")
UNTRUSTED_EXTERNAL_KWARGS = ("in_chans", "drop_rate", "drop_path_rate", "dropout", "attention_dropout",
                             "width_per_group", "groups")
"""The only kwargs a ``torchvision:``/``timm:`` builder receives from an untrusted source (numbers only):
architecture numbers -- never weights, ``pretrained`` switches, file paths or URLs."""
_MAX_UNTRUSTED_STRING = 64


def register_model(name: str, builder: Callable[..., nn.Module] | None = None):
    """Register a backbone builder under ``name`` (usable as a decorator).

    The builder takes keyword arguments and returns an ``nn.Module`` mapping
    images to ``[B, feature_dim]`` with an int attribute ``feature_dim``.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"name must be a non-empty string without ':', got {name!r}")

    def _register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"a model named {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return _register(builder) if builder is not None else _register


register_model("small_cnn", small_cnn)
register_model("resnet18", resnet18_backbone)


def untrusted_kwargs_problem(name, kwargs) -> str | None:
    """Why model ``name`` must not be built with ``kwargs`` read from an untrusted file, or ``None`` if it may.

    Allowed: a registered rcfast model with keyword arguments its builder
    declares, each a plain number, boolean or short name (no path separators);
    a ``torchvision:``/``timm:`` model with only :data:`UNTRUSTED_EXTERNAL_KWARGS`,
    each a number. Anything else -- unknown keys, nested values, strings that
    could be paths or URLs, ``pretrained``-style switches -- is refused.
    """
    if not isinstance(name, str) or not name:
        return f"a model name that is not a non-empty string ({name!r})"
    if not isinstance(kwargs, Mapping):
        return f"kwargs that are not a mapping ({type(kwargs).__name__})"
    external = name.startswith(_EXTERNAL_PREFIXES)
    if not external and name not in _REGISTRY:
        return f"an unknown model {name!r} (registered: {available_models()}, or torchvision:/timm: names)"
    accepted = UNTRUSTED_EXTERNAL_KWARGS if external else tuple(
        p.name for p in inspect.signature(_REGISTRY[name]).parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))
    for key, value in kwargs.items():
        if not isinstance(key, str) or key not in accepted:
            return f"the keyword {key!r}, which is not passed on from an untrusted file (allowed: {list(accepted)})"
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number or (not external and isinstance(value, bool)):
            continue
        if (not external and isinstance(value, str) and len(value) <= _MAX_UNTRUSTED_STRING and value.isprintable()
                and not any(c in value for c in "/\\:")):
            continue
        return f"{key}={value!r}, not a plain number{'' if external else ', boolean or short name'}"
    return None


def available_models() -> list[str]:
    """Registered backbone names (``torchvision:``/``timm:`` names come on top)."""
    return sorted(_REGISTRY)


def _import_external(prefix: str, name: str):
    library = prefix[:-1]
    try:
        return importlib.import_module(library)
    except ImportError as exc:
        raise ImportError(
            f"model {name!r} needs the optional package {library!r}, which is not importable here "
            f"({exc}). Install it (matching your torch build), or use one of {available_models()}"
        ) from exc


def _call_builder(name: str, builder: Callable[..., nn.Module], kwargs: Mapping) -> nn.Module:
    try:
        return builder(**kwargs)
    except TypeError as exc:
        raise ValueError(f"model {name!r} rejected its arguments {dict(kwargs)}: {exc}") from exc


def _strip_last_linear(model: nn.Module, name: str) -> tuple[nn.Module, int]:
    """Replace the last ``nn.Linear`` (the classifier) with ``Identity``; return the in-width."""
    last = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = module_name
    if last is None:
        raise ValueError(f"model {name!r} has no final nn.Linear classifier to strip for use as a backbone")
    parent_name, _, child = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    feature_dim = getattr(parent, child).in_features
    setattr(parent, child, nn.Identity())
    # Which keys of the full classifier's state_dict the backbone lacks (student.init_from drops them).
    model.classifier_name = last
    return model, feature_dim


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the backbone ``name``; the result has an int ``feature_dim``.

    ``"torchvision:resnet50"`` builds ``torchvision.models.get_model("resnet50",
    **kwargs)`` with its final linear classifier replaced by ``Identity``;
    ``"timm:<name>"`` builds ``timm.create_model(name, num_classes=0, **kwargs)``.
    Nothing is downloaded unless ``kwargs`` ask for pretrained weights.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    if name.startswith("torchvision:"):
        torchvision = _import_external("torchvision:", name)
        importlib.import_module("torchvision.models")
        arch = name.split(":", 1)[1]
        model = _call_builder(name, lambda **kw: torchvision.models.get_model(arch, **kw), kwargs)
        model, feature_dim = _strip_last_linear(model, name)
        model.feature_dim = feature_dim
        return model
    if name.startswith("timm:"):
        timm = _import_external("timm:", name)
        arch = name.split(":", 1)[1]
        model = _call_builder(name, lambda **kw: timm.create_model(arch, num_classes=0, **kw), kwargs)
        model.feature_dim = int(model.num_features)
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        if isinstance(cfg.get("classifier"), str):
            model.classifier_name = cfg["classifier"]  # the head timm dropped for num_classes=0
        return model
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown model {name!r}; registered: {available_models()} "
            f"(or a 'torchvision:<name>' / 'timm:<name>' model when that library is installed)"
        )
    model = _call_builder(name, _REGISTRY[name], kwargs)
    if not isinstance(getattr(model, "feature_dim", None), int):
        raise TypeError(f"builder of model {name!r} returned a module without an int 'feature_dim'")
    return model


def build_classifier(name: str, num_classes: int, **kwargs) -> nn.Module:
    """A classifier ``images -> [B, num_classes]`` on the architecture ``name``.

    For registered names it is a single-head :class:`MultiHeadStudent` (head
    ``"logits"``); for ``torchvision:``/``timm:`` names it is the library's own
    model with ``num_classes`` outputs, so its native state_dicts load as is.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(name, str) and name.startswith("torchvision:"):
        torchvision = _import_external("torchvision:", name)
        importlib.import_module("torchvision.models")
        arch = name.split(":", 1)[1]
        return _call_builder(
            name, lambda **kw: torchvision.models.get_model(arch, num_classes=num_classes, **kw), kwargs)
    if isinstance(name, str) and name.startswith("timm:"):
        timm = _import_external("timm:", name)
        arch = name.split(":", 1)[1]
        return _call_builder(name, lambda **kw: timm.create_model(arch, num_classes=num_classes, **kw), kwargs)
    backbone = build_model(name, **kwargs)
    return MultiHeadStudent(backbone, backbone.feature_dim, {"logits": num_classes})


def build_student(backbone: str, heads: Mapping[str, int], **backbone_kwargs) -> MultiHeadStudent:
    """A :class:`MultiHeadStudent` with ``heads`` on the named backbone."""
    net = build_model(backbone, **backbone_kwargs)
    return MultiHeadStudent(net, net.feature_dim, heads)


def classifier_backbone(model: nn.Module) -> nn.Module:
    """The feature extractor of a classifier, for transfer evaluation.

    A :class:`MultiHeadStudent` gives its ``backbone`` (shared, not copied); any
    other classifier gives a deep copy with its last ``nn.Linear`` replaced by
    ``Identity`` (the original keeps its classifier).
    """
    if isinstance(model, MultiHeadStudent):
        return model.backbone
    stripped, feature_dim = _strip_last_linear(copy.deepcopy(model), type(model).__name__)
    stripped.feature_dim = feature_dim
    return stripped
