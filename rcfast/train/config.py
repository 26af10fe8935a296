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

Every field has a valid range (see :meth:`RunConfig.validate`): a learning rate
that is not a finite positive number, a negative weight decay, clip norm or
term weight, ``min_lr_ratio`` outside [0, 1], zero threads... are refused with
the key named. A config file is untrusted text: it must be UTF-8 YAML of at most
:data:`MAX_CONFIG_BYTES`, whose aliases expand to at most
:data:`MAX_CONFIG_VALUES` values and never refer to themselves.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

__all__ = [
    "ConfigError", "StudentConfig", "TeacherConfig", "DataConfig", "TaskConfig", "OptimConfig",
    "TrainConfig", "RunConfig", "load_config", "config_from_dict", "config_to_dict", "dump_config",
    "apply_overrides", "PROXY_STREAM", "MAX_IMAGE_SIZE", "MAX_THREADS", "parse_yaml", "read_config_text",
    "check_plain_data", "normalized_config_dict", "MAX_CONFIG_BYTES", "MAX_CONFIG_VALUES",
]

PRECISIONS = ("fp32", "bf16", "fp16")
PROXY_STREAM = "proxy"
OPTIMIZERS = ("adamw", "adam", "sgd", "lamb")
OPTIMIZER_IMPLS = ("auto", "torch", "apex")
DATA_BACKENDS = ("auto", "dali", "pil")
DIST_BACKENDS = ("auto", "nccl", "gloo")
MAX_CONFIG_BYTES = 256 << 10
"""A run config is a small text file (a few KiB); anything larger is refused before it is parsed."""
MAX_CONFIG_VALUES = 50_000
"""How many values a config may hold once YAML aliases are expanded (a "billion laughs" file holds 10**9)."""
MAX_CONFIG_DEPTH = 64
"""How deeply a config's YAML may nest (deep flow nesting crashes or stalls YAML parsers)."""
# libyaml's loader when PyYAML has it (fast); both construct plain data only, like yaml.safe_load.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_IMAGE_SIZE = 4096
"""The largest ``data.image_size`` (pixels per side): anything larger is a typo, not a data set."""
MAX_THREADS = 1024
"""The most threads or data workers a config may ask for (more than any machine has cores)."""
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_MAX_SEED = 2**63 - 1


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
    marks the broad-domain teacher (informational). ``sha256`` (optional) pins
    the checkpoint file's SHA-256 (as ``sha256sum`` prints it): a file with
    other bytes is refused before training.
    """

    name: str = ""
    builder: str = ""
    checkpoint: str = ""
    num_classes: int = 0
    builder_kwargs: dict = field(default_factory=dict)
    generalist: bool = False
    sha256: str = ""


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

    ``resume``: ``auto`` (the newest usable checkpoint in ``out_dir``),
    ``none``, or a checkpoint file. A resumed run must have the same config but
    for run-length, logging, checkpoint, location and thread fields
    (:mod:`rcfast.train.resume`), unless ``allow_config_change``.
    ``dist_timeout_s``: how long a DDP collective waits for the other ranks
    before the run stops with an error (``init_process_group(timeout=...)``).
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
    dist_timeout_s: float = 600.0
    allow_config_change: bool = False


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
    #: a teacher cache folder (``rcfast cache-teachers``) read instead of running the teachers
    teacher_cache: str = ""

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
        """Check every field's range and the cross-field consistency, and the objective against the run.

        Raises :class:`ConfigError` naming the key.
        """
        self._validate_train()
        self._validate_optim()
        self._validate_student()
        self._validate_data()
        for i, tc in enumerate(self.teachers):
            for key in ("name", "builder", "checkpoint"):
                if not getattr(tc, key):
                    raise ConfigError(f"teachers[{i}].{key} must be set")
            if tc.num_classes <= 0:
                raise ConfigError(f"teachers[{i}].num_classes must be > 0, got {tc.num_classes}")
            _check_kwargs(f"teachers[{i}].builder_kwargs", tc.builder_kwargs)
            if tc.sha256 and not _SHA256.match(tc.sha256):
                raise ConfigError(f"teachers[{i}].sha256 must be 64 hex digits (as sha256sum prints), got "
                                  f"{tc.sha256!r}")
        _check_unique("teachers", [tc.name for tc in self.teachers], "teacher")
        for i, task in enumerate(self.tasks):
            if not task.name or not task.source or task.num_classes <= 0:
                raise ConfigError(f"tasks[{i}] needs a name, a source and num_classes > 0")
            if task.name == PROXY_STREAM:
                raise ConfigError(f"tasks[{i}].name {PROXY_STREAM!r} is reserved for the proxy data (data.source)")
        _check_unique("tasks", [task.name for task in self.tasks], "task")
        heads = self.student_heads()
        if not heads:
            raise ConfigError("the student has no heads: set student.heads {name: num_classes}, or give "
                              "teachers (one head each) or tasks")
        if not self.objective:
            raise ConfigError("objective must list at least one term, e.g. objective: [{term: multihead_kd}] to "
                              "distil every teacher into its head, or [{term: cross_entropy, head: <task>}]")
        if self.teacher_cache and not (self.teachers and self.data.source):
            raise ConfigError("teacher_cache needs the run's teachers and data.source: the cache holds those "
                              "teachers' logits on those images")
        self._check_objective(heads)
        return self

    def _validate_train(self) -> None:
        t = self.train
        if t.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {PRECISIONS}, got {t.precision!r}")
        for key, value, low in (("max_steps", t.max_steps, 1), ("log_every", t.log_every, 1),
                                ("checkpoint_every", t.checkpoint_every, 0),
                                ("keep_checkpoints", t.keep_checkpoints, 1)):
            if value < low:
                raise ConfigError(f"train.{key} must be >= {low}, got {value}")
        if not 0 <= t.seed <= _MAX_SEED:
            raise ConfigError(f"train.seed must be in [0, 2**63 - 1], got {t.seed}")
        if t.num_threads is not None and not 0 < t.num_threads <= MAX_THREADS:
            raise ConfigError(f"train.num_threads must be in [1, {MAX_THREADS}] (or null: torch's default), got "
                              f"{t.num_threads}")
        if not t.out_dir:
            raise ConfigError("train.out_dir must be a folder path")
        if t.device != "auto":
            import torch  # noqa: PLC0415  (a device string is checked where torch parses it)
            try:
                torch.device(t.device)
            except (RuntimeError, ValueError) as exc:
                raise ConfigError(f"train.device must be 'auto' or a torch device like 'cpu' or 'cuda:0', got "
                                  f"{t.device!r}") from exc
        from rcfast.ops.backends import BACKENDS  # noqa: PLC0415
        if t.loss_backend not in ("auto",) + BACKENDS:
            raise ConfigError(f"train.loss_backend must be one of {('auto',) + BACKENDS}, got {t.loss_backend!r}")
        if t.dist_backend not in DIST_BACKENDS:
            raise ConfigError(f"train.dist_backend must be one of {DIST_BACKENDS}, got {t.dist_backend!r}")
        if not (math.isfinite(t.dist_timeout_s) and t.dist_timeout_s >= 1):
            raise ConfigError(f"train.dist_timeout_s must be a finite number of seconds >= 1, got {t.dist_timeout_s}")

    def _validate_optim(self) -> None:
        o = self.optim
        if o.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name must be one of {OPTIMIZERS}, got {o.name!r}")
        if o.impl not in OPTIMIZER_IMPLS:
            raise ConfigError(f"optim.impl must be one of {OPTIMIZER_IMPLS}, got {o.impl!r}")
        if not (math.isfinite(o.lr) and o.lr > 0):
            raise ConfigError(f"optim.lr must be a finite number > 0, got {o.lr}")
        if not (math.isfinite(o.weight_decay) and o.weight_decay >= 0):
            raise ConfigError(f"optim.weight_decay must be a finite number >= 0, got {o.weight_decay}")
        if not (math.isfinite(o.momentum) and 0 <= o.momentum < 1):
            raise ConfigError(f"optim.momentum must be in [0, 1), got {o.momentum}")
        if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                        for b in o.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas!r}")
        if o.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
        if not (math.isfinite(o.min_lr_ratio) and 0 <= o.min_lr_ratio <= 1):
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1] (the final LR as a fraction of optim.lr), got "
                              f"{o.min_lr_ratio}")
        if o.clip_grad_norm is not None and not (math.isfinite(o.clip_grad_norm) and o.clip_grad_norm > 0):
            raise ConfigError(f"optim.clip_grad_norm must be a finite number > 0, or null for no clipping, got "
                              f"{o.clip_grad_norm}")

    def _validate_student(self) -> None:
        if not self.student.backbone:
            raise ConfigError("student.backbone must name a model")
        _check_kwargs("student.backbone_kwargs", self.student.backbone_kwargs)
        for name, size in self.student.heads.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"student.heads: head names must be non-empty strings, got {name!r}")
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise ConfigError(f"student.heads.{name} must be a positive number of classes, got {size!r}")

    def _validate_data(self) -> None:
        d = self.data
        if d.batch_size <= 0:
            raise ConfigError(f"data.batch_size must be > 0, got {d.batch_size}")
        if not 0 < d.image_size <= MAX_IMAGE_SIZE:
            raise ConfigError(f"data.image_size must be in [1, {MAX_IMAGE_SIZE}], got {d.image_size}")
        if not 0 <= d.num_threads <= MAX_THREADS:
            raise ConfigError(f"data.num_threads must be in [0, {MAX_THREADS}], got {d.num_threads}")
        if d.backend not in DATA_BACKENDS:
            raise ConfigError(f"data.backend must be one of {DATA_BACKENDS}, got {d.backend!r}")
        try:
            from rcfast.data.plan import AUGMENTS  # noqa: PLC0415  (the data pipeline's own list)
        except ImportError:  # without the data extra no pipeline runs; the command says so first
            AUGMENTS = None
        if AUGMENTS is not None and d.augment not in AUGMENTS:
            raise ConfigError(f"data.augment must be one of {AUGMENTS}, got {d.augment!r}")

    def _check_objective(self, heads: dict[str, int]) -> list:
        from rcfast.train.objectives import Objective, RunLayout

        layout = RunLayout(heads=heads, teachers={tc.name: tc.num_classes for tc in self.teachers},
                           streams=self.stream_infos(), loss_backend=self.train.loss_backend)
        return Objective.from_specs(self.objective).check_layout(layout)

    def objective_inputs(self) -> list:
        """The inputs (:mod:`rcfast.train.objectives.inputs` keys) the objective's terms declare for this run."""
        self.validate()
        return self._check_objective(self.student_heads())


def _check_kwargs(key: str, kwargs: dict) -> None:
    for name in kwargs:
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{key}: keyword names must be identifiers, got {name!r}")


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
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{key} must be a number of float range, got an integer of "
                              f"{len(str(abs(value)))} digits") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        if "\x00" in value:
            raise ConfigError(f"{key} contains a NUL character, which no path or name may hold")
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
    check_plain_data(data)
    _refuse_legacy(data)
    return _from_dict(RunConfig, data).validate()


def parse_yaml(text: str, where: str):
    """``yaml.safe_load(text)``, after a streaming pass that refuses deep nesting and huge value counts.

    The pass reads parser events (no recursion, no objects built), so a hostile
    text fails in milliseconds instead of crashing the C loader or stalling the
    Python one; alias bombs are caught after loading by :func:`check_plain_data`.
    """
    depth = events = 0
    try:
        for event in yaml.parse(text, Loader=_YAML_LOADER):
            events += 1
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                depth += 1
                if depth > MAX_CONFIG_DEPTH:
                    raise ConfigError(f"{where} nests more than {MAX_CONFIG_DEPTH} levels deep; a run config is "
                                      "nearly flat")
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                depth -= 1
            if events > 2 * MAX_CONFIG_VALUES:
                raise ConfigError(f"{where} holds more than {MAX_CONFIG_VALUES} values; a run config is small")
        return yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506  (a safe loader: plain data only)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(exc).split())}") from None


def check_plain_data(data, what: str = "the config", limit: int = MAX_CONFIG_VALUES) -> int:
    """Count the values of a parsed config with aliases expanded; refuse bombs and self-references.

    YAML aliases (and pickle memo references, for a config stored in a
    checkpoint) share one object between many places: walking such a value
    naively takes exponential time or never ends. Shared parts are counted
    once per place they appear, in time linear in the distinct objects.
    Returns the count; raises :class:`ConfigError` above ``limit`` or on a cycle.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def count(node) -> int:
        if not isinstance(node, (dict, list, tuple)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(f"{what} refers to itself (a recursive YAML alias): it has no finite value")
        open_nodes.add(key)
        total = 1
        for child in (list(node.keys()) + list(node.values())) if isinstance(node, dict) else node:
            total += count(child)
            if total > limit:
                raise ConfigError(f"{what} holds more than {limit} values once its YAML aliases are expanded; "
                                  "a run config is small (an alias bomb?)")
        open_nodes.discard(key)
        sizes[key] = total
        return total

    try:
        return count(data)
    except RecursionError:
        raise ConfigError(f"{what} is nested too deeply to be a run config") from None


def normalized_config_dict(data) -> dict:
    """``data`` (a config dict, e.g. one stored in a checkpoint) with every default filled in.

    Not validated; a dict that does not parse as a config (another rcfast
    version's) is returned as it is, after the same size checks as a config file.
    """
    if not isinstance(data, dict):
        return data
    check_plain_data(data, "the stored config")
    try:
        return config_to_dict(_from_dict(RunConfig, data))
    except (ConfigError, TypeError, ValueError):
        return data


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
        if not all(keys):
            raise ConfigError(f"--set {dotted!r}: a key path is dot-separated names, like train.max_steps")
        value = parse_yaml(raw, f"--set {dotted}: the value {raw[:80]!r}")
        node = data
        for depth, key in enumerate(keys[:-1]):
            node = _child(node, key, ".".join(keys[: depth + 1]))
        last = keys[-1]
        if isinstance(node, list):
            index = _index(node, last, dotted)
            node[index] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {dotted}: cannot index into a {type(node).__name__}")
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


def read_config_text(path: str | Path) -> str:
    """The text of a config file (or pipe): UTF-8 of at most :data:`MAX_CONFIG_BYTES`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory, not a YAML file")
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path, "rb") as f:  # a bounded read: a pipe or a device works, /dev/zero is refused by size
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path} is larger than {MAX_CONFIG_BYTES >> 10} KiB; a run config is a small "
                          "YAML file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not a UTF-8 text file (byte {exc.start} is 0x{raw[exc.start]:02x}); "
                          "--config takes a YAML run config") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply ``key=value`` overrides, validate it."""
    path = Path(path)
    data = parse_yaml(read_config_text(path), str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config must be a mapping (key: value lines) at the top level, got a "
                          f"{type(data).__name__}")
    try:
        check_plain_data(data)
        data = apply_overrides(data, overrides or [])
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
