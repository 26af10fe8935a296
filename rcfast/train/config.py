"""Run configuration: dataclasses mirrored one-to-one by YAML files.

``load_config("run.yaml", overrides=["train.max_steps=100"])`` reads a YAML file
into a :class:`RunConfig`; :func:`config_to_dict`/:func:`dump_config` write it
back, so YAML -> dataclass -> YAML round-trips. Unknown keys and values of the
wrong type are rejected with a :class:`ConfigError` naming the key, and
:meth:`RunConfig.validate` is the one place a whole run is checked -- including
its ``objective`` against the heads, teachers and data it names -- before any
model or data pipeline is built. A config in the old form (``train.mode``,
``train.ce_weight``, ``teachers[].temperature``...) is refused with the
``objective:`` that replaces it.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

__all__ = [
    "ConfigError", "StudentConfig", "TeacherConfig", "DataConfig", "TaskConfig", "OptimConfig",
    "TrainConfig", "RunConfig", "load_config", "config_from_dict", "config_to_dict", "dump_config",
    "apply_overrides", "PROXY_STREAM",
]

PRECISIONS = ("fp32", "bf16", "fp16")
PROXY_STREAM = "proxy"
OPTIMIZERS = ("adamw", "adam", "sgd", "lamb")
OPTIMIZER_IMPLS = ("auto", "torch", "apex")


class ConfigError(ValueError):
    """A configuration is malformed: unknown key, wrong type or inconsistent values."""


@dataclass
class StudentConfig:
    """The student: a backbone by registry name (see :func:`rcfast.models.build_model`) and its heads.

    ``heads``: ``{name: num_classes}`` in packed order; empty (default) means
    one head per teacher, in the teachers' order (or, with no teachers, one
    per labeled task). ``init_from``: a checkpoint to start the backbone from
    (a classifier's or backbone's state_dict, an rcfast checkpoint, a
    ``torchvision:``/``timm:`` state_dict); its classifier layer is dropped and
    every other key must match the backbone.
    """

    backbone: str = "small_cnn"
    backbone_kwargs: dict = field(default_factory=dict)
    heads: dict = field(default_factory=dict)
    init_from: str = ""


@dataclass
class TeacherConfig:
    """One named teacher; objective terms name the teachers they use (``multihead_kd`` by default
    distils each into the student head of the same ``name``).

    ``checkpoint`` is a state_dict file of ``build_classifier(builder,
    num_classes, **builder_kwargs)`` (or an rcfast checkpoint holding one under
    ``"model"``), loaded with ``torch.load(weights_only=True)``. ``generalist``
    marks the broad-domain teacher (informational).
    """

    name: str = ""
    builder: str = ""
    checkpoint: str = ""
    num_classes: int = 0
    builder_kwargs: dict = field(default_factory=dict)
    generalist: bool = False


@dataclass
class DataConfig:
    """Images for training (``rcfast.data.ProxyImages`` arguments).

    ``source`` is the proxy data (the data stream ``proxy``; ``labels: true``
    if it has class folders a term uses); each labeled task's ``source`` is
    read with these same settings. ``shuffle: null`` follows ``ProxyImages``
    (shuffle with ``rrc_flip`` only).
    """

    source: str = ""
    image_size: int = 224
    batch_size: int = 64
    augment: str = "rrc_flip"
    backend: str = "auto"
    num_threads: int = 2
    drop_last: bool = True
    labels: bool = False
    shuffle: Optional[bool] = None


@dataclass
class TaskConfig:
    """A labeled task: the data stream ``name`` (a class-folder tree at ``source``).

    A ``cross_entropy`` term on the head of the same name reads it by default;
    with no teachers and no ``student.heads``, each task is one student head.
    """

    name: str = ""
    source: str = ""
    num_classes: int = 0


@dataclass
class OptimConfig:
    """Optimiser, schedule (linear warm-up then cosine) and gradient clipping."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    impl: str = "auto"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    clip_grad_norm: Optional[float] = 1.0


@dataclass
class TrainConfig:
    """The training loop: steps, precision, devices, logging, checkpoints.

    ``num_threads`` and ``deterministic`` are process-wide: the ``rcfast``
    command applies them (:mod:`rcfast.train.runtime`, which also seeds the
    process with ``seed``) before any model touches a device, and the trainer
    only checks that they hold. ``seed`` also seeds the run itself (the
    student's initialisation, terms' parameters, the data order), inside the
    trainer's own RNG scope.
    """

    max_steps: int = 1000
    precision: str = "fp32"
    device: str = "auto"
    seed: int = 0
    deterministic: bool = False
    num_threads: Optional[int] = None
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    out_dir: str = "runs/consolidate"
    resume: str = "auto"
    progress: bool = True
    loss_backend: str = "auto"
    sync_batchnorm: bool = False
    dist_backend: str = "auto"


@dataclass
class RunConfig:
    """A whole run: ``rcfast consolidate --config run.yaml`` reads exactly this."""

    student: StudentConfig = field(default_factory=StudentConfig)
    teachers: list[TeacherConfig] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    objective: list[dict] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def student_heads(self) -> dict[str, int]:
        """``{head: num_classes}`` of the student: ``student.heads``, else one per teacher, else one per task."""
        if self.student.heads:
            return dict(self.student.heads)
        if self.teachers:
            return {tc.name: tc.num_classes for tc in self.teachers}
        return {task.name: task.num_classes for task in self.tasks}

    def stream_infos(self) -> dict:
        """``{stream: StreamInfo}``: ``proxy`` (when ``data.source`` is set), then each task."""
        from rcfast.train.objectives import StreamInfo

        streams = {}
        if self.data.source:
            streams[PROXY_STREAM] = StreamInfo(labels=self.data.labels)
        for task in self.tasks:
            streams[task.name] = StreamInfo(labels=True, num_classes=task.num_classes)
        return streams

    def validate(self) -> "RunConfig":
        """Check cross-field consistency, and the objective against the run; raise :class:`ConfigError` naming the key."""
        t = self.train
        if t.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {PRECISIONS}, got {t.precision!r}")
        if t.max_steps <= 0:
            raise ConfigError(f"train.max_steps must be > 0, got {t.max_steps}")
        if t.log_every <= 0:
            raise ConfigError(f"train.log_every must be > 0, got {t.log_every}")
        if t.checkpoint_every < 0 or t.keep_checkpoints < 1:
            raise ConfigError("train.checkpoint_every must be >= 0 and train.keep_checkpoints >= 1")
        if t.num_threads is not None and t.num_threads <= 0:
            raise ConfigError(f"train.num_threads must be > 0 (or null), got {t.num_threads}")
        if self.optim.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name must be one of {OPTIMIZERS}, got {self.optim.name!r}")
        if self.optim.impl not in OPTIMIZER_IMPLS:
            raise ConfigError(f"optim.impl must be one of {OPTIMIZER_IMPLS}, got {self.optim.impl!r}")
        if self.optim.lr <= 0 or self.optim.warmup_steps < 0:
            raise ConfigError("optim.lr must be > 0 and optim.warmup_steps >= 0")
        if len(self.optim.betas) != 2:
            raise ConfigError(f"optim.betas must be two floats, got {self.optim.betas!r}")
        if not self.student.backbone:
            raise ConfigError("student.backbone must name a model")
        if self.data.batch_size <= 0 or self.data.image_size <= 0:
            raise ConfigError("data.batch_size and data.image_size must be > 0")
        for i, tc in enumerate(self.teachers):
            for key in ("name", "builder", "checkpoint"):
                if not getattr(tc, key):
                    raise ConfigError(f"teachers[{i}].{key} must be set")
            if tc.num_classes <= 0:
                raise ConfigError(f"teachers[{i}].num_classes must be > 0, got {tc.num_classes}")
        _check_unique("teachers", [tc.name for tc in self.teachers], "teacher")
        for i, task in enumerate(self.tasks):
            if not task.name or not task.source or task.num_classes <= 0:
                raise ConfigError(f"tasks[{i}] needs a name, a source and num_classes > 0")
            if task.name == PROXY_STREAM:
                raise ConfigError(f"tasks[{i}].name {PROXY_STREAM!r} is reserved for the proxy data (data.source)")
        _check_unique("tasks", [task.name for task in self.tasks], "task")
        for name, size in self.student.heads.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"student.heads: head names must be non-empty strings, got {name!r}")
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise ConfigError(f"student.heads.{name} must be a positive number of classes, got {size!r}")
        heads = self.student_heads()
        if not heads:
            raise ConfigError("the student has no heads: set student.heads {name: num_classes}, or give "
                              "teachers (one head each) or tasks")
        if not self.objective:
            raise ConfigError("objective must list at least one term, e.g. objective: [{term: multihead_kd}] to "
                              "distil every teacher into its head, or [{term: cross_entropy, head: <task>}]")
        self._check_objective(heads)
        return self

    def _check_objective(self, heads: dict[str, int]) -> None:
        from rcfast.train.objectives import Objective, RunLayout

        layout = RunLayout(heads=heads, teachers={tc.name: tc.num_classes for tc in self.teachers},
                           streams=self.stream_infos(), loss_backend=self.train.loss_backend)
        Objective.from_specs(self.objective).check_layout(layout)


def _check_unique(key: str, names: list[str], what: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"{key}: the name {name!r} is used twice; {what} names must be unique")
        seen.add(name)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, key: str):
    """Check/convert one YAML value to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return _from_dict(tp, value, key)
    if origin is list or tp is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        if args:
            return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def _from_dict(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!s}; valid keys{' of ' + prefix if prefix else ''}: {names}"
        )
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


_LEGACY_KEYS = {"train": ("mode", "ce_weight", "ce_head"), "teachers": ("temperature", "weight"),
                "tasks": ("weight",)}


def _legacy_keys(data: dict) -> list[str]:
    found = []
    for section, keys in _LEGACY_KEYS.items():
        value = data.get(section)
        entries = [("", value)] if isinstance(value, dict) else (
            [(f"[{i}]", e) for i, e in enumerate(value)] if isinstance(value, list) else [])
        for where, entry in entries:
            if isinstance(entry, dict):
                found += [f"{section}{where}.{k}" for k in keys if k in entry]
    return found


def _legacy_objective(data: dict) -> list[dict]:
    """The ``objective:`` that does what an old-form config (``train.mode`` ...) did."""
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    entries = [e for e in data.get("teachers") or [] if isinstance(e, dict)]
    tasks = [e for e in data.get("tasks") or [] if isinstance(e, dict)]
    if train.get("mode", "distill") == "supervised":
        return [dict({"term": "cross_entropy", "head": task.get("name")},
                     **({"weight": task["weight"]} if task.get("weight", 1.0) != 1.0 else {})) for task in tasks]

    def per_teacher(key: str, default: float):
        values = {e.get("name"): e.get(key, default) for e in entries}
        distinct = set(values.values())
        return next(iter(distinct)) if len(distinct) <= 1 else values

    kd = {"term": "multihead_kd", "temperature": per_teacher("temperature", 4.0) if entries else 4.0}
    weights = per_teacher("weight", 1.0) if entries else 1.0
    if weights != 1.0:
        kd["head_weights"] = weights
    objective = [kd]
    if train.get("ce_weight", 0.0):
        objective.append({"term": "cross_entropy", "head": train.get("ce_head"), "weight": train["ce_weight"]})
    return objective


def _refuse_legacy(data: dict) -> None:
    found = _legacy_keys(data)
    if not found:
        return
    # One line of flow-style YAML: the CLI reports errors as one-liners.
    snippet = yaml.safe_dump(_legacy_objective(data), sort_keys=False, default_flow_style=True, width=10**6).strip()
    raise ConfigError(
        f"this config is in the old form ({', '.join(found)}): a run's loss is now an objective of named "
        f"terms. Remove those keys and write instead: objective: {snippet}")


def config_from_dict(data: dict) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a nested dict (parsed YAML)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a run config must be a mapping at the top level, got {type(data).__name__}")
    _refuse_legacy(data)
    return _from_dict(RunConfig, data).validate()


def config_to_dict(config: RunConfig) -> dict:
    """The plain-dict (YAML-ready) form of a config."""
    return dataclasses.asdict(config)


def dump_config(config: RunConfig, path: str | Path | None = None) -> str:
    """Serialise a config to YAML text (and write it to ``path`` if given)."""
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested dict.

    List entries are addressed by index: ``teachers.0.weight=2``.
    """
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {dotted}: value {raw!r} is not valid YAML: {exc}") from exc
        node = data
        for depth, key in enumerate(keys[:-1]):
            node = _child(node, key, ".".join(keys[: depth + 1]))
        last = keys[-1]
        if isinstance(node, list):
            index = _index(node, last, dotted)
            node[index] = value
        else:
            node[last] = value
    return data


def _index(node: list, key: str, dotted: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"--set {dotted}: {key!r} is not an index of a list of {len(node)} entries")
    return int(key)


def _child(node, key: str, dotted: str):
    if isinstance(node, list):
        return node[_index(node, key, dotted)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {dotted}: cannot index into a {type(node).__name__}")
    if key not in node or node[key] is None:
        node[key] = {}
    return node[key]


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply ``key=value`` overrides, validate it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config must be a mapping at the top level")
    data = apply_overrides(data, overrides or [])
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
