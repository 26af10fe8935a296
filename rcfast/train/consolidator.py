"""``Consolidator``: one training loop over an objective of named, weighted terms.

The student (a :class:`~rcfast.models.MultiHeadStudent`) is trained on the sum
of the objective's terms (:mod:`rcfast.train.objectives`): ``multihead_kd`` of
teachers on unlabeled proxy images is representation consolidation (all task
teachers + a generalist), single-head KD (one teacher) or multi-teacher KD;
``cross_entropy`` per head on its own labeled task is the multi-task "oracle"
(or a teacher, with one task); terms combine freely. The loop never learns a
term's name: each term declares its inputs, :class:`~rcfast.train.step_inputs.InputPlan`
computes each of them once per step.

Around that: AMP (bf16, or fp16 with GradScaler), fused optimiser, warm-up +
cosine schedule, gradient clipping, tqdm, JSONL metrics (per-term losses),
atomic checkpoints with exact resume (student, the terms' own parameters,
optimiser, scaler, schedule, RNG, data position), DDP under ``torchrun``.

What a run guarantees (docs/trust.md): a resume continues the same run
(:mod:`rcfast.train.resume`); every checkpoint and ``final.pt`` carries a
content hash (:mod:`rcfast.train.checkpoint`); no checkpoint or model with
non-finite values is ever written -- a device-side flag collects non-finite
losses without a host sync per step and is checked, with the weights, before
every write (:class:`~rcfast.train.errors.DivergenceError`); a DDP collective
that does not complete within ``train.dist_timeout_s`` stops the run
(:class:`~rcfast.train.errors.DistributedError`).

The trainer leaves the caller's process as it found it: it does not set
threads, determinism or cuBLAS workspace (:mod:`rcfast.train.runtime` does,
called by the ``rcfast`` command; the trainer only checks them), and it seeds
and draws from the global RNGs only inside :func:`~rcfast.train.checkpoint.isolated_rng`.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from rcfast.models import MultiHeadStudent, build_student
from rcfast.train.checkpoint import (capture_rng_state, check_free_space, check_writable, checkpoint_path,
                                     isolated_rng, latest_checkpoint, load_checkpoint, prune_checkpoints,
                                     restore_rng_state, save_checkpoint_file, seed_everything)
from rcfast.train.config import (PROXY_STREAM, ConfigError, OptimConfig, RunConfig, TrainConfig, config_to_dict,
                                 dump_config)
from rcfast.train.distributed import DistContext, is_collective_failure, setup_distributed
from rcfast.train.errors import CheckpointError, DistributedError, DivergenceError, TrainingError
from rcfast.train.metrics import MetricsWriter
from rcfast.train.objectives import Objective, RunLayout, StreamInfo
from rcfast.train.optim import build_optimizer, build_scheduler
from rcfast.train.resume import (RESUMABLE_CHANGES, ResumePoint, check_resume, check_trainer_checkpoint,
                                 find_resume_point)
from rcfast.train.runtime import check_runtime
from rcfast.train.step_inputs import InputPlan
from rcfast.train.streams import DataStream
from rcfast.train.teachers import OnlineTeachers, TeacherSource, load_teacher, teacher_file_sha256

__all__ = ["Consolidator", "CHECKPOINT_FORMAT", "MODEL_FORMAT"]

CHECKPOINT_FORMAT = "rcfast.consolidator/2"
"""Trainer checkpoints (``checkpoints/checkpoint_<step>.pt``): everything to continue a run exactly."""
MODEL_FORMAT = "rcfast.model/1"
"""``final.pt``: the student's weights, heads, step and config."""
# Optimiser state tensors per parameter, for the disk-space estimate of a checkpoint.
_OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "lamb": 2, "sgd": 1}
_AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _checkpoint_bytes(student: nn.Module, optimizer: str) -> int:
    """About how much disk a run needs for its checkpoints: one, its temporary copy while written, and final.pt."""
    params = sum(p.numel() * p.element_size() for p in student.parameters())
    buffers = sum(b.numel() * b.element_size() for b in student.buffers())
    checkpoint = params * (1 + _OPTIMIZER_STATES.get(optimizer, 2)) + buffers
    return 2 * checkpoint + params + buffers


def _stream_info(dataset) -> StreamInfo:
    num_classes = getattr(dataset, "num_classes", None)
    return StreamInfo(labels=bool(getattr(dataset, "labels", False)),
                      num_classes=num_classes if isinstance(num_classes, int) else None)


class Consolidator:
    """Train a :class:`~rcfast.models.MultiHeadStudent` on an objective.

    Args:
        student: the student; its head names/sizes define the packed layout.
        objective: an :class:`~rcfast.train.objectives.Objective`, or its
            YAML-style specs (``[{"term": "multihead_kd", "weight": 1.0}, ...]``).
        data: the data streams: one dataset (the stream ``"proxy"``) or
            ``{stream: dataset}`` (``"proxy"`` and/or labeled tasks by name),
            each with the ``rcfast.data.ProxyImages`` interface. Streams are
            drawn, and concatenated for the student's forward, in this order.
        teachers: ``{name: nn.Module}`` (run online) or a
            :class:`~rcfast.train.teachers.TeacherSource`; ``None`` without teachers.
        train, optim: loop and optimiser settings.
        run_config: the full config, stored in checkpoints (for ``rcfast eval``).
        dist_context: an existing :class:`DistContext` (default: set one up
            from the ``torchrun`` environment).
        example_images: a small batch like the data's, for terms that measure
            layer shapes when they build parameters (``from_config`` passes one).

    The objective is bound (every term's inputs checked) here, before any
    training. ``fit()`` runs to ``train.max_steps`` (resuming first per
    ``train.resume``) and returns a summary dict.
    """

    def __init__(self, student: MultiHeadStudent, objective: Objective | Sequence[Mapping],
                 data=None, *, teachers: Mapping[str, nn.Module] | TeacherSource | None = None,
                 train: TrainConfig | None = None, optim: OptimConfig | None = None,
                 run_config: RunConfig | None = None, dist_context: DistContext | None = None,
                 example_images: torch.Tensor | None = None) -> None:
        if not isinstance(student, MultiHeadStudent):
            raise TypeError(f"student must be a MultiHeadStudent, got {type(student).__name__}")
        self.train_cfg = train or TrainConfig()
        self.optim_cfg = optim or OptimConfig()
        self.run_config = run_config
        cfg = self.train_cfg
        self.ctx = dist_context or setup_distributed(cfg.device, cfg.dist_backend, cfg.dist_timeout_s)
        self.device = self.ctx.device
        check_runtime(cfg, self.device)
        if cfg.precision not in _AMP_DTYPES:
            raise ValueError(f"train.precision must be one of {list(_AMP_DTYPES)}, got {cfg.precision!r}")
        self.amp_dtype = _AMP_DTYPES[cfg.precision]
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("train.precision='fp16' needs a CUDA device (fp16 without a GPU has no "
                             "GradScaler support); use 'bf16' on CPU")

        datasets = {} if data is None else (dict(data) if isinstance(data, Mapping) else {PROXY_STREAM: data})
        self.streams: dict[str, DataStream] = {name: DataStream(name, ds) for name, ds in datasets.items()}
        for name, stream in self.streams.items():
            self._check_shard(name, stream.dataset)
            if hasattr(stream.dataset, "__len__") and len(stream.dataset) == 0:
                raise ValueError(f"data stream {name!r} yields no batch: it has fewer samples than one batch and "
                                 "drops the last partial batch (lower the batch size, or keep partial batches)")
        if teachers is None:
            self.teachers: TeacherSource | None = None
        elif isinstance(teachers, TeacherSource):
            self.teachers = teachers
        else:
            self.teachers = OnlineTeachers(teachers)
        if isinstance(self.teachers, OnlineTeachers) and self.teachers.autocast is None:
            self.teachers.autocast = self._autocast  # teachers run in the run's precision
        if self.teachers is not None:
            self.teachers.to(self.device)
        self.student = student.to(self.device)
        if cfg.sync_batchnorm:
            if self.device.type != "cuda":
                raise ValueError("train.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm is GPU-only)")
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)

        self.objective = objective if isinstance(objective, Objective) else Objective.from_specs(objective)
        layout = RunLayout(
            heads=dict(zip(self.student.head_names, self.student.splits)),
            teachers=dict(self.teachers.num_classes) if self.teachers is not None else {},
            streams={name: _stream_info(s.dataset) for name, s in self.streams.items()},
            loss_backend=cfg.loss_backend, student=self.student,
            teacher_models=self.teachers.models if self.teachers is not None else None,
            example_images=example_images)
        with isolated_rng():
            seed_everything(cfg.seed)  # terms' own parameters start the same in every run (and rank)
            inputs = self.objective.bind(layout)
        self.objective.to(self.device)

        self.model: nn.Module = self.student
        self.objective_model: nn.Module = self.objective
        if self.ctx.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.student, device_ids=device_ids)
            if self.objective.has_trainable_parameters():
                # The terms' own parameters (encoders, a peer model) are averaged over ranks too.
                self.objective_model = nn.parallel.DistributedDataParallel(self.objective, device_ids=device_ids)
        self.inputs = InputPlan(inputs, list(self.streams), self.student, self.model, self.teachers,
                                layout.heads, self.device, self._autocast)
        # Student parameters first, then the terms': the optimiser's state order is stable.
        self.trainable = nn.ModuleList([self.student, self.objective])
        self.optimizer = build_optimizer(self.trainable, self.optim_cfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, self.optim_cfg, cfg.max_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.step = 0
        self.out_dir = Path(cfg.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.metrics = MetricsWriter(self.out_dir / "metrics.jsonl") if self.ctx.is_main else None
        self.callbacks: list = []
        # The first step whose loss was not finite (0: none), kept on the device: checking it
        # every step would synchronise a GPU every step; it is read before every write instead.
        self._first_nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)
        self._last_loss: torch.Tensor | None = None
        #: the parts of a step that will be logged, computed before its update (see train_step)
        self._step_parts: dict | None = None
        #: sha256 of each teacher's checkpoint file (from_config), recorded in checkpoints and compared on resume
        self.teacher_files: dict[str, str] | None = None
        #: changes a resume accepted: ``[{"step": N, "changes": [[field, old, new], ...]}]``
        self.config_changes: list[dict] = []
        self.resume_point: ResumePoint | None = None  # a checkpoint found and loaded before fit() (from_config)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: RunConfig) -> "Consolidator":
        """Build student, teachers (from their checkpoints) and ``ProxyImages`` data streams from a config.

        Cheap checks come first, so a mistake is reported in seconds, before any
        teacher or image is loaded: the config's ranges, ``train.out_dir`` is
        writable, data sources and checkpoint files exist, pinned teacher
        hashes match, and a checkpoint to resume is usable and was written by
        this config (:mod:`rcfast.train.resume`). Then the student is built
        (and the disk checked for room for its checkpoints), the teachers, and
        the data streams (scanning a large folder is the longest step; a batch
        larger than the data set is refused).

        With ``teacher_cache: DIR`` the teachers are read from that cache
        (:class:`~rcfast.train.teacher_cache.CachedTeachers`, checked against
        this run's data, plan and teachers) instead of being loaded and run.

        Run-wide process settings are not applied here (see
        :func:`rcfast.train.runtime.apply_runtime`); the caller's RNG states are
        left as they were.
        """
        from rcfast.data import NoBatchError, ProxyImages  # the data pipeline is needed only for config-driven runs
        from rcfast.train.init_from import init_student_from

        config.validate()
        t, d = config.train, config.data
        ctx = setup_distributed(t.device, t.dist_backend, t.dist_timeout_s)
        out_dir = Path(t.out_dir)
        if ctx.is_main:
            check_writable(out_dir)
        sources = [("data.source", d.source)] if d.source else []
        sources += [(f"tasks[{i}].source", task.source) for i, task in enumerate(config.tasks)]
        for key, source in sources:
            if not Path(source).exists():
                raise FileNotFoundError(f"{key}: data source {source} does not exist")
        if config.student.init_from and not Path(config.student.init_from).exists():
            raise FileNotFoundError(f"student.init_from: checkpoint file {config.student.init_from} does not exist")
        teacher_files = {tc.name: teacher_file_sha256(tc) for tc in config.teachers}
        resume_point = find_resume_point(t.resume, out_dir / "checkpoints", check_trainer_checkpoint(CHECKPOINT_FORMAT))
        if resume_point is not None:
            check_resume(resume_point, config_to_dict(config), t.max_steps, t.allow_config_change, teacher_files)

        with isolated_rng():
            seed_everything(t.seed)  # the same initial student on every rank (DDP also broadcasts it)
            try:
                student = build_student(config.student.backbone, config.student_heads(),
                                        **config.student.backbone_kwargs)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"student: cannot build backbone {config.student.backbone!r} with backbone_kwargs "
                                  f"{config.student.backbone_kwargs}: {exc}") from exc
            if config.student.init_from:
                init_student_from(student, config.student.init_from)
        if ctx.is_main:
            check_free_space(out_dir, _checkpoint_bytes(student, config.optim.name))

        teachers = {}
        with isolated_rng():
            probe = torch.zeros(1, 3, d.image_size, d.image_size, device=ctx.device)
            for tc in [] if config.teacher_cache else config.teachers:  # a cache replaces the models
                teacher = load_teacher(tc, ctx.device)
                with torch.inference_mode():
                    out = teacher(probe)
                if out.dim() != 2 or out.shape[1] != tc.num_classes:
                    raise ValueError(f"teacher {tc.name!r} ({tc.builder}) outputs {tuple(out.shape)} logits, "
                                     f"but teachers[].num_classes is {tc.num_classes}")
                teachers[tc.name] = teacher

        def proxy(key: str, source: str, labels: bool) -> ProxyImages:
            try:
                dataset = ProxyImages(source, image_size=d.image_size, batch_size=d.batch_size,
                                      device=str(ctx.device), seed=t.seed, augment=d.augment, labels=labels,
                                      drop_last=d.drop_last, backend=d.backend, num_threads=d.num_threads,
                                      shuffle=d.shuffle)
            except NoBatchError as exc:  # named by the config keys that decide it
                raise ConfigError(
                    f"data.batch_size={d.batch_size} is larger than the {exc.num_images} images {key} gives this "
                    f"process ({exc.total_images} in all, over {ctx.world_size} process(es)): with "
                    "data.drop_last: true not one batch is left. Lower data.batch_size or set data.drop_last: false"
                ) from None
            except ValueError as exc:
                raise ConfigError(f"{key}: {exc}") from exc
            return dataset

        data = {}
        if d.source:
            data[PROXY_STREAM] = proxy("data.source", d.source, labels=d.labels)
        for i, task in enumerate(config.tasks):
            data[task.name] = proxy(f"tasks[{i}].source", task.source, labels=True)

        teacher_source = None
        if config.teacher_cache:
            from rcfast.train.teacher_cache import CachedTeachers  # checks the cache against this run
            teacher_source = CachedTeachers.for_run(config, data[PROXY_STREAM])
        elif teachers:
            teacher_source = OnlineTeachers(teachers, num_classes={tc.name: tc.num_classes for tc in config.teachers})
        trainer = cls(student, Objective.from_specs(config.objective), data, teachers=teacher_source, train=t,
                      optim=config.optim, run_config=config, dist_context=ctx,
                      example_images=torch.zeros(2, 3, d.image_size, d.image_size))
        trainer.teacher_files = teacher_files
        trainer.resume_point = resume_point
        return trainer

    def _check_shard(self, name: str, dataset) -> None:
        """Every rank must read its own shard, or DDP silently trains on duplicated data."""
        shard_id, num_shards = getattr(dataset, "shard_id", None), getattr(dataset, "num_shards", None)
        if shard_id is None or num_shards is None:
            return
        if (shard_id, num_shards) != (self.ctx.rank, self.ctx.world_size):
            raise ValueError(
                f"dataset {name!r} is shard {shard_id} of {num_shards}, but this process is rank "
                f"{self.ctx.rank} of {self.ctx.world_size}: build datasets after torch.distributed is "
                "initialised (setup_distributed(); Consolidator.from_config does this) or pass shard_id/num_shards")

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def train_step(self):
        """One optimiser step; returns ``(loss, term values, images this rank drew, step inputs)``."""
        self.model.train()
        self.objective.train()
        batches = {name: self.streams[name].next() for name in self.inputs.streams}
        positions = {name: self.streams[name].position() for name in self.inputs.streams}
        step_inputs = self.inputs.compute(batches, self.step, positions)
        loss, values = self.objective_model(step_inputs)
        if self._is_logged(self.step + 1):
            # Before the update: a term's parts may read live parameters (a fused head's weight).
            self._step_parts = self.objective.parts(step_inputs)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.optim_cfg.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.trainable.parameters(), self.optim_cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        self._note_loss(loss)
        images = sum(step_inputs.batch_sizes.values())
        return loss, values, images, step_inputs

    # ------------------------------------------------------------------ divergence
    def _note_loss(self, loss: torch.Tensor) -> None:
        """Remember the first step whose loss is not finite -- on the device, with no host sync."""
        self._last_loss = loss.detach()
        if self.scaler.is_enabled():
            return  # fp16: GradScaler skips the steps whose gradients overflow; weights are checked at writes
        first_bad = (self._first_nonfinite == 0) & ~torch.isfinite(self._last_loss)
        self._first_nonfinite = torch.where(first_bad, self.step, self._first_nonfinite)

    def _state_tensors(self):
        """``(name, tensor)`` of every floating-point tensor a checkpoint holds: weights, buffers, optimiser state."""
        for prefix, module in (("model", self.student), ("objective", self.objective)):
            for name, tensor in module.state_dict().items():
                yield f"{prefix}.{name}", tensor
        names = {id(p): n for n, p in self.trainable.named_parameters()}
        for param, state in self.optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    yield f"optimizer[{names.get(id(param), '?')}].{key}", value

    def _weights_finite(self) -> torch.Tensor:
        """A device bool: are all the tensors a checkpoint would hold finite? (no host sync)"""
        flags = [torch.isfinite(t).all().to(self.device) for _, t in self._state_tensors()
                 if t.is_floating_point() or t.is_complex()]
        return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=self.device)

    def check_finite(self, writing: str) -> None:
        """Raise :class:`DivergenceError` before ``writing`` if any rank saw a non-finite loss or any weight is.

        One host sync (and, under DDP, one small all-reduce: every rank must call it).
        """
        flags = torch.stack([(~self._weights_finite()).to(torch.int64), self._first_nonfinite])
        weights_bad, first_bad = self.ctx.max(flags).tolist()
        if weights_bad or first_bad:
            raise self._divergence(writing, int(first_bad), bool(weights_bad))

    def _divergence(self, writing: str, first_bad: int, weights_bad: bool) -> DivergenceError:
        found = []
        if first_bad:
            found.append(f"the loss was not finite at step {first_bad}")
        if weights_bad:
            bad = [name for name, t in self._state_tensors()
                   if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())]
            found.append(f"{len(bad)} weight/optimiser tensors hold NaN or inf at step {self.step} "
                         f"(first: {bad[0] if bad else '?'})")
        last_good = latest_checkpoint(self.checkpoint_dir)
        kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written before"
        return DivergenceError(
            f"training diverged: {' and '.join(found)}. Stopped before writing {writing}: nothing holding non-finite "
            f"values was written, and {kept}. Lower optim.lr (or check the data and objective weights), then resume "
            "from it with the new setting (rcfast consolidate --allow-config-change)")

    # ------------------------------------------------------------------ checkpoints
    def _rank_state(self) -> dict:
        return {"rng": capture_rng_state(),
                "data": {name: stream.state_dict() for name, stream in self.streams.items()}}

    def _config_dict(self) -> dict | None:
        return config_to_dict(self.run_config) if self.run_config is not None else None

    def _provenance(self) -> dict:
        """What the run was made of, stored in checkpoints and final.pt (plain data)."""
        return {"config": self._config_dict(), "teacher_files": self.teacher_files,
                "config_changes": self.config_changes}

    def state_dict(self) -> dict:
        """Everything needed to continue this run exactly (tensors and primitives only)."""
        loss = None
        if self._last_loss is not None:
            loss = float(self.ctx.mean(self._last_loss.float()))  # a collective: every rank calls state_dict
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "world_size": self.ctx.world_size,
            "heads": {"names": list(self.student.head_names), "splits": list(self.student.splits)},
            "model": self.student.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ranks": self.ctx.all_gather_object(self._rank_state()),
            "loss": loss,
            **self._provenance(),
        }

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint_<step>.pt`` atomically, with its content hash (main rank; every rank must call it).

        Raises :class:`DivergenceError` instead if anything it would hold is not
        finite (earlier checkpoints are kept), and ``OSError`` naming the file
        if it cannot be written (the previous checkpoints are intact).
        """
        path = checkpoint_path(self.checkpoint_dir, self.step)
        self.check_finite(f"checkpoint {path.name}")
        state = self.state_dict()  # a collective under DDP: all ranks take part
        if not self.ctx.is_main:
            return None
        save_checkpoint_file(state, path)
        prune_checkpoints(self.checkpoint_dir, self.train_cfg.keep_checkpoints)
        return path

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (every rank loads the same file)."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"not an rcfast trainer checkpoint of format {CHECKPOINT_FORMAT!r} "
                                  f"(format {state.get('format')!r})")
        heads = {"names": list(self.student.head_names), "splits": list(self.student.splits)}
        if state["heads"] != heads:
            raise ValueError(f"checkpoint heads {state['heads']} differ from the student's {heads}")
        if state["world_size"] != self.ctx.world_size:
            raise ValueError(f"checkpoint was written by {state['world_size']} processes; resume it with the "
                             f"same number (got {self.ctx.world_size}) so data shards and RNG line up")
        self.student.load_state_dict(state["model"])
        self.objective.load_state_dict(state.get("objective", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        mine = state["ranks"][self.ctx.rank]
        restore_rng_state(mine["rng"])
        for name, stream in self.streams.items():
            stream.load_state_dict(mine["data"][name])
        self.step = int(state["step"])
        self.config_changes = list(state.get("config_changes") or [])

    def _find_resume_point(self) -> ResumePoint | None:
        return find_resume_point(self.train_cfg.resume, self.checkpoint_dir,
                                 check_trainer_checkpoint(CHECKPOINT_FORMAT))

    def _remove_stale_temp_files(self) -> None:
        # Left by a run killed mid-write; never complete, never loaded.
        if self.ctx.is_main and self.checkpoint_dir.is_dir():
            for tmp in self.checkpoint_dir.glob(".checkpoint_*.pt.tmp-*"):
                tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train to ``train.max_steps``, then export ``final.pt``.

        Returns ``{steps, trained_steps, resumed_from, loss, images_per_sec,
        wall_time_s, checkpoint, final}``: ``steps`` is the run's step count,
        ``trained_steps`` how many this call trained. The global RNGs are
        seeded (or restored from the checkpoint) for the run and put back as
        the caller had them when ``fit`` returns.
        """
        with isolated_rng():
            try:
                return self._fit()
            except RuntimeError as exc:
                if self.ctx.distributed and not isinstance(exc, TrainingError) and is_collective_failure(exc):
                    raise DistributedError(
                        f"rank {self.ctx.rank}: a collective operation failed at step {self.step + 1}: another rank "
                        f"stopped, or did not answer within train.dist_timeout_s={self.train_cfg.dist_timeout_s:g} s "
                        f"({' '.join(str(exc).split())[:300]})") from exc
                raise

    def _is_logged(self, step: int) -> bool:
        """Is the step that ends with ``self.step == step`` written to the metrics?"""
        return step % self.train_cfg.log_every == 0 or step == self.train_cfg.max_steps

    def _log_record(self, loss, values, interval_images: int, elapsed: float) -> tuple[dict, bool]:
        """The metrics record of this step (values averaged over ranks), and whether any rank saw a non-finite loss."""
        # train_step computed them for this step (the same _is_logged condition), before the update
        parts, self._step_parts = self._step_parts, None
        flat = [loss.detach().float()] + [v.float() for v in values.values()]
        flat += [v.float() for term_parts in parts.values() for v in term_parts.values()]
        flat.append((self._first_nonfinite > 0).float())  # rides along the same all-reduce
        means = self.ctx.mean(torch.stack(flat)).tolist()
        nonfinite_seen = means.pop() > 0
        means = iter(means)
        record = {"step": self.step, "loss": next(means), "terms": {name: next(means) for name in values}}
        if parts:
            record["parts"] = {name: {k: next(means) for k in term_parts} for name, term_parts in parts.items()}
        record.update({"lr": self.scheduler.get_last_lr()[0],
                       "images_per_sec": interval_images / max(elapsed, 1e-9),
                       "epoch": {n: s.epoch for n, s in self.streams.items()}})
        return record, nonfinite_seen

    def _start(self) -> ResumePoint | None:
        """Resume (or seed) the run and prepare ``out_dir``; returns the checkpoint resumed from."""
        cfg = self.train_cfg
        if self.ctx.is_main:
            check_writable(self.out_dir)
        point, self.resume_point = self.resume_point or self._find_resume_point(), None
        if point is None:
            seed_everything(cfg.seed + self.ctx.rank)
            return None
        changes = check_resume(point, self._config_dict(), cfg.max_steps, cfg.allow_config_change, self.teacher_files)
        self.load_state_dict(point.state)
        if changes:
            self.config_changes.append({"step": self.step, "changes": [list(c) for c in changes]})
        if self.ctx.is_main and self.step < cfg.max_steps:
            saved = point.state.get("config")
            if isinstance(saved, dict) and any(c[0] not in RESUMABLE_CHANGES for c in changes):
                # The run continues under another config: keep the one it ran under so far.
                self.out_dir.mkdir(parents=True, exist_ok=True)
                try:
                    text = yaml.safe_dump(saved, sort_keys=False)
                except yaml.YAMLError:  # read from a file: not necessarily plain YAML data
                    text = f"# not representable as YAML; as Python sees it:\n# {saved!r}\n"
                (self.out_dir / f"config.before_step_{self.step}.yaml").write_text(text)
        return point

    def _already_complete(self, point: ResumePoint) -> dict:
        """A resume at ``max_steps``: nothing to train; (re)write final.pt only if it is missing or unusable."""
        final = self.out_dir / "final.pt"
        missing = False
        if self.ctx.is_main:
            try:
                load_checkpoint(final)
            except CheckpointError:
                missing = True
        if self.ctx.all_gather_object(missing)[0]:  # every rank takes part in export_model's check
            self.export_model(final)
        return {"steps": self.step, "trained_steps": 0, "resumed_from": str(point.path),
                "loss": point.state.get("loss"), "images_per_sec": float("nan"), "wall_time_s": 0.0,
                "checkpoint": str(point.path), "final": str(final)}

    def _fit(self) -> dict:
        cfg = self.train_cfg
        point = self._start()
        if point is not None and self.step >= cfg.max_steps:
            return self._already_complete(point)
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temp_files()
            if self.run_config is not None:
                dump_config(self.run_config, self.out_dir / "config.yaml")
            self.metrics.truncate_after(self.step)
        start_step = self.step
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.ctx.is_main), desc="rcfast")
        last_loss = float("nan")
        run_start = interval_start = time.perf_counter()
        interval_images = total_images = 0
        last_saved = self.step if point is not None else None
        try:
            while self.step < cfg.max_steps:
                loss, values, batch_images, step_inputs = self.train_step()
                interval_images += batch_images * self.ctx.world_size
                total_images += batch_images * self.ctx.world_size
                bar.update(1)
                if self._is_logged(self.step):
                    record, nonfinite_seen = self._log_record(loss, values, interval_images,
                                                              time.perf_counter() - interval_start)
                    if nonfinite_seen:
                        self.check_finite(f"the metrics of step {self.step}")  # raises, naming the first bad step
                    last_loss = record["loss"]
                    postfix = {"loss": f"{last_loss:.4f}"}
                    if len(record["terms"]) > 1:
                        postfix.update({name: f"{v:.4f}" for name, v in record["terms"].items()})
                    postfix["img_s"] = f"{record['images_per_sec']:.0f}"
                    bar.set_postfix(postfix)
                    if self.metrics is not None:
                        self.metrics.write(record)
                    interval_start, interval_images = time.perf_counter(), 0
                del step_inputs  # the step's activations are not kept past logging
                for callback in self.callbacks:
                    callback(self)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                    last_saved = self.step
            if last_saved != self.step:
                self.save_checkpoint()
            self.export_model()
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
        wall = time.perf_counter() - run_start
        return {
            "steps": self.step,
            "trained_steps": self.step - start_step,
            "resumed_from": str(point.path) if point is not None else None,
            "loss": last_loss,
            "images_per_sec": total_images / wall if total_images else float("nan"),
            "wall_time_s": wall,
            "checkpoint": str(checkpoint_path(self.checkpoint_dir, self.step)),
            "final": str(self.out_dir / "final.pt"),
        }

    def export_model(self, path: str | Path | None = None) -> Path | None:
        """Write the student's weights alone (main rank) to ``path`` (default ``<out_dir>/final.pt``).

        ``{"format", "model", "heads", "step", "config", "teacher_files",
        "config_changes"}`` with its content hash, loadable with
        ``weights_only=True``; usable as a teacher checkpoint and by ``rcfast
        eval``. Raises :class:`DivergenceError` instead if a weight is not
        finite (every rank must call it under DDP).
        """
        path = Path(path) if path is not None else self.out_dir / "final.pt"
        self.check_finite(f"the model {path.name}")
        if not self.ctx.is_main:
            return None
        return save_checkpoint_file({
            "format": MODEL_FORMAT, "model": self.student.state_dict(), "step": self.step,
            "heads": {"names": list(self.student.head_names), "splits": list(self.student.splits)},
            **self._provenance(),
        }, path)

    def close(self) -> None:
        """Leave the process group if this trainer joined it."""
        self.ctx.shutdown()

    def add_callback(self, callback) -> None:
        """Call ``callback(trainer)`` after every step (before that step's checkpoint)."""
        self.callbacks.append(callback)

