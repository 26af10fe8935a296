"""A folder of teachers: one small YAML per teacher beside its checkpoint.

``<repo>/<name>.yaml``::

    builder: small_cnn            # a name rcfast.models.build_classifier knows
    num_classes: 10
    builder_kwargs: {width: 16}   # optional
    checkpoint: <name>.pt         # optional; default: the YAML's stem + ".pt"

Everything in the folder is untrusted data. The YAML is read with
``yaml.safe_load`` and its keys are allow-listed; ``builder_kwargs`` may hold
only plain numbers, booleans and short strings, and for third-party builders
(``torchvision:``/``timm:``) only the numeric architecture keys of
:data:`EXTERNAL_BUILDER_KWARGS` -- never weights, ``pretrained`` switches or
file paths, which would make a library download or open files. The
checkpoint must lie inside the folder; it is loaded later with
``torch.load(weights_only=True)``. A teacher whose description is unusable is
returned as :class:`Skipped` with the reason; the others are still usable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rcfast.extras import require

__all__ = ["TeacherSpec", "Skipped", "read_repository", "EXTERNAL_BUILDER_KWARGS", "SPEC_KEYS"]

SPEC_KEYS = ("builder", "num_classes", "builder_kwargs", "checkpoint")
#: builder_kwargs a torchvision:/timm: builder may receive from a repository YAML (numbers only)
EXTERNAL_BUILDER_KWARGS = ("in_chans", "drop_rate", "drop_path_rate", "dropout", "attention_dropout",
                           "width_per_group", "groups")
_EXTERNAL_PREFIXES = ("torchvision:", "timm:")
_MAX_STRING = 64


@dataclass
class TeacherSpec:
    """A teacher as its YAML describes it (checked, not yet built)."""

    name: str
    builder: str
    num_classes: int
    checkpoint: Path
    builder_kwargs: dict = field(default_factory=dict)


@dataclass
class Skipped:
    """A teacher that cannot be used, and why."""

    name: str
    reason: str


def _check_kwargs(builder: str, kwargs) -> str | None:
    """The reason ``kwargs`` are refused for ``builder``, or ``None``."""
    if not isinstance(kwargs, dict):
        return f"builder_kwargs must be a mapping, got {type(kwargs).__name__}"
    external = builder.startswith(_EXTERNAL_PREFIXES)
    for key, value in kwargs.items():
        if not isinstance(key, str):
            return f"builder_kwargs key {key!r} is not a string"
        if external and key not in EXTERNAL_BUILDER_KWARGS:
            return (f"builder_kwargs key {key!r} is not allowed for the third-party builder {builder!r} (allowed: "
                    f"{', '.join(EXTERNAL_BUILDER_KWARGS)}; weights, pretrained switches and paths never are)")
        if isinstance(value, bool) or isinstance(value, (int, float)):
            if external and isinstance(value, bool):
                return f"builder_kwargs[{key!r}] must be a number for {builder!r}, got {value!r}"
            continue
        if isinstance(value, str) and not external and len(value) <= _MAX_STRING and "/" not in value \
                and "\\" not in value:
            continue
        return f"builder_kwargs[{key!r}] = {value!r} is not a plain number, boolean or short name"
    return None


def _spec(path: Path, directory: Path) -> TeacherSpec | Skipped:
    import yaml

    name = path.stem
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return Skipped(name, f"{path.name} is not readable YAML: {exc}")
    if not isinstance(data, dict):
        return Skipped(name, f"{path.name} must hold a mapping with {', '.join(SPEC_KEYS[:2])}")
    unknown = sorted(str(k) for k in data if k not in SPEC_KEYS)
    if unknown:
        return Skipped(name, f"{path.name}: unknown keys {unknown} (allowed: {', '.join(SPEC_KEYS)})")
    builder, num_classes = data.get("builder"), data.get("num_classes")
    if not isinstance(builder, str) or not builder:
        return Skipped(name, f"{path.name}: builder must be a model name, got {builder!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        return Skipped(name, f"{path.name}: num_classes must be a positive int, got {num_classes!r}")
    kwargs = data.get("builder_kwargs") or {}
    reason = _check_kwargs(builder, kwargs)
    if reason:
        return Skipped(name, f"{path.name}: {reason}")
    checkpoint = data.get("checkpoint", f"{name}.pt")
    if not isinstance(checkpoint, str):
        return Skipped(name, f"{path.name}: checkpoint must be a file name, got {checkpoint!r}")
    resolved = (directory / checkpoint).resolve()
    if resolved.parent != directory.resolve():
        return Skipped(name, f"{path.name}: checkpoint {checkpoint!r} is not a file of the repository folder")
    if not resolved.is_file():
        return Skipped(name, f"checkpoint {checkpoint} does not exist")
    return TeacherSpec(name=name, builder=builder, num_classes=num_classes, checkpoint=resolved,
                       builder_kwargs=dict(kwargs))


def read_repository(directory) -> list[TeacherSpec | Skipped]:
    """The teachers of ``directory`` (one ``*.yaml``/``*.yml`` each), in name order.

    Checkpoints (``*.pt``, ``*.pth``) that no YAML names are reported as
    :class:`Skipped` too, so nothing in the folder is silently ignored.
    Raises ``FileNotFoundError`` if the folder does not exist.
    """
    require("a teacher repository (its YAML files)", "yaml")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--repo: {directory} is not a folder")
    specs = [_spec(path, directory) for path in sorted(directory.iterdir())
             if path.suffix in (".yaml", ".yml") and path.is_file()]
    named = {spec.checkpoint for spec in specs if isinstance(spec, TeacherSpec)}
    named |= {(directory / f"{spec.name}.pt").resolve() for spec in specs if isinstance(spec, Skipped)}
    for path in sorted(directory.iterdir()):
        if path.suffix in (".pt", ".pth") and path.resolve() not in named:
            specs.append(Skipped(path.stem, f"{path.name} has no {path.stem}.yaml describing its builder"))
    return sorted(specs, key=lambda spec: spec.name)
