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

The trainer leaves the caller's process as it found it: it does not set
threads, determinism or cuBLAS workspace (:mod:`rcfast.train.runtime` does,
called by the ``rcfast`` command; the trainer only checks them), and it seeds
and draws from the global RNGs only inside :func:`~rcfast.train.checkpoint.isolated_rng`.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from rcfast.models import MultiHeadStudent, build_student
from rcfast.train.checkpoint import (atomic_save, capture_rng_state, checkpoint_path, isolated_rng,
                                     latest_checkpoint, load_checkpoint, prune_checkpoints, restore_rng_state,
                                     seed_everything)
from rcfast.train.config import PROXY_STREAM, OptimConfig, RunConfig, TrainConfig, config_to_dict, dump_config
from rcfast.train.distributed import DistContext, setup_distributed
from rcfast.train.metrics import MetricsWriter
from rcfast.train.objectives import Objective, RunLayout, StreamInfo
from rcfast.train.optim import build_optimizer, build_scheduler
from rcfast.train.runtime import check_runtime
from rcfast.train.step_inputs import InputPlan
from rcfast.train.streams import DataStream
from rcfast.train.teachers import OnlineTeachers, TeacherSource, load_teacher

__all__ = ["Consolidator", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "rcfast.consolidator/1"
_AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
        self.ctx = dist_context or setup_distributed(cfg.device, cfg.dist_backend)
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

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: RunConfig) -> "Consolidator":
        """Build student, teachers (from their checkpoints) and ``ProxyImages`` data streams from a config.

        Run-wide process settings are not applied here (see
        :func:`rcfast.train.runtime.apply_runtime`); the caller's RNG states are
        left as they were.
        """
        from rcfast.data import ProxyImages  # the data pipeline is needed only for config-driven runs
        from rcfast.train.init_from import init_student_from

        config.validate()
        t = config.train
        ctx = setup_distributed(t.device, t.dist_backend)
        d = config.data

        def proxy(source: str, labels: bool) -> ProxyImages:
            if not Path(source).exists():
                raise FileNotFoundError(f"data source {source} does not exist")
            return ProxyImages(source, image_size=d.image_size, batch_size=d.batch_size,
                               device=str(ctx.device), seed=t.seed, augment=d.augment, labels=labels,
                               drop_last=d.drop_last, backend=d.backend, num_threads=d.num_threads,
                               shuffle=d.shuffle)

        with isolated_rng():
            seed_everything(t.seed)  # the same initial student on every rank (DDP also broadcasts it)
            student = build_student(config.student.backbone, config.student_heads(),
                                    **config.student.backbone_kwargs)
            if config.student.init_from:
                init_student_from(student, config.student.init_from)
            teachers = {}
            probe = torch.zeros(1, 3, d.image_size, d.image_size, device=ctx.device)
            for tc in config.teachers:
                teacher = load_teacher(tc, ctx.device)
                with torch.inference_mode():
                    out = teacher(probe)
                if out.dim() != 2 or out.shape[1] != tc.num_classes:
                    raise ValueError(f"teacher {tc.name!r} ({tc.builder}) outputs {tuple(out.shape)} logits, "
                                     f"but teachers[].num_classes is {tc.num_classes}")
                teachers[tc.name] = teacher
        data = {}
        if d.source:
            data[PROXY_STREAM] = proxy(d.source, labels=d.labels)
        for task in config.tasks:
            data[task.name] = proxy(task.source, labels=True)
        teacher_source = None
        if teachers:
            teacher_source = OnlineTeachers(teachers, num_classes={tc.name: tc.num_classes for tc in config.teachers})
        trainer = cls(student, Objective.from_specs(config.objective), data, teachers=teacher_source, train=t,
                      optim=config.optim, run_config=config, dist_context=ctx,
                      example_images=torch.zeros(2, 3, d.image_size, d.image_size))
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
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.optim_cfg.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.trainable.parameters(), self.optim_cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        images = sum(step_inputs.batch_sizes.values())
        return loss, values, images, step_inputs

    # ------------------------------------------------------------------ checkpoints
    def _rank_state(self) -> dict:
        return {"rng": capture_rng_state(),
                "data": {name: stream.state_dict() for name, stream in self.streams.items()}}

    def state_dict(self) -> dict:
        """Everything needed to continue this run exactly (tensors and primitives only)."""
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
            "config": config_to_dict(self.run_config) if self.run_config is not None else None,
        }

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint_<step>.pt`` atomically (main rank; every rank must call it)."""
        state = self.state_dict()  # a collective under DDP: all ranks take part
        if not self.ctx.is_main:
            return None
        path = atomic_save(state, checkpoint_path(self.checkpoint_dir, self.step))
        prune_checkpoints(self.checkpoint_dir, self.train_cfg.keep_checkpoints)
        return path

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (every rank loads the same file)."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not an rcfast trainer checkpoint (format {state.get('format')!r})")
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

    def _resume_path(self) -> Path | None:
        resume = self.train_cfg.resume
        if resume in ("none", "", None):
            return None
        if resume == "auto":
            return latest_checkpoint(self.checkpoint_dir)
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"train.resume: checkpoint file {path} does not exist")
        return path

    def _remove_stale_temp_files(self) -> None:
        # Left by a run killed mid-write; never complete, never loaded.
        if self.ctx.is_main and self.checkpoint_dir.is_dir():
            for tmp in self.checkpoint_dir.glob(".checkpoint_*.pt.tmp-*"):
                tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train to ``train.max_steps``, then export ``final.pt``.

        Returns ``{steps, resumed_from, loss, images_per_sec, wall_time_s, checkpoint, final}``.
        The global RNGs are seeded (or restored from the checkpoint) for the run
        and put back as the caller had them when ``fit`` returns.
        """
        with isolated_rng():
            return self._fit()

    def _log_record(self, loss, values, step_inputs, interval_images: int, elapsed: float) -> dict:
        """The metrics record of this step (values averaged over ranks)."""
        parts = self.objective.parts(step_inputs)
        flat = [loss.detach().float()] + [v.float() for v in values.values()]
        flat += [v.float() for term_parts in parts.values() for v in term_parts.values()]
        means = iter(self.ctx.mean(torch.stack(flat)).tolist())
        record = {"step": self.step, "loss": next(means), "terms": {name: next(means) for name in values}}
        if parts:
            record["parts"] = {name: {k: next(means) for k in term_parts} for name, term_parts in parts.items()}
        record.update({"lr": self.scheduler.get_last_lr()[0],
                       "images_per_sec": interval_images / max(elapsed, 1e-9),
                       "epoch": {n: s.epoch for n, s in self.streams.items()}})
        return record

    def _fit(self) -> dict:
        cfg = self.train_cfg
        resumed_from = self._resume_path()
        if resumed_from is not None:
            self.load_state_dict(load_checkpoint(resumed_from, map_location="cpu"))
        else:
            seed_everything(cfg.seed + self.ctx.rank)
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temp_files()
            if self.run_config is not None:
                dump_config(self.run_config, self.out_dir / "config.yaml")
            self.metrics.truncate_after(self.step)
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.ctx.is_main), desc="rcfast")
        last_loss = float("nan")
        run_start = interval_start = time.perf_counter()
        interval_images = total_images = 0
        last_saved = self.step if resumed_from is not None else None
        try:
            while self.step < cfg.max_steps:
                loss, values, batch_images, step_inputs = self.train_step()
                interval_images += batch_images * self.ctx.world_size
                total_images += batch_images * self.ctx.world_size
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    record = self._log_record(loss, values, step_inputs, interval_images,
                                              time.perf_counter() - interval_start)
                    last_loss = record["loss"]
                    # Checked here, where the loss is on the host anyway: a per-step check
                    # would synchronise a GPU every step.
                    if not math.isfinite(last_loss) and not self.scaler.is_enabled():
                        raise FloatingPointError(f"loss is {last_loss} at step {self.step} (terms: {record['terms']})")
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
            "resumed_from": str(resumed_from) if resumed_from else None,
            "loss": last_loss,
            "images_per_sec": total_images / wall if total_images else float("nan"),
            "wall_time_s": wall,
            "checkpoint": str(checkpoint_path(self.checkpoint_dir, self.step)),
            "final": str(self.out_dir / "final.pt"),
        }

    def export_model(self, path: str | Path | None = None) -> Path | None:
        """Write the student's weights alone (main rank) to ``path`` (default ``<out_dir>/final.pt``).

        ``{"model", "heads", "step", "config"}``, loadable with ``weights_only=True``;
        usable as a teacher checkpoint and by ``rcfast eval``.
        """
        if not self.ctx.is_main:
            return None
        path = Path(path) if path is not None else self.out_dir / "final.pt"
        return atomic_save({
            "model": self.student.state_dict(), "step": self.step,
            "heads": {"names": list(self.student.head_names), "splits": list(self.student.splits)},
            "config": config_to_dict(self.run_config) if self.run_config is not None else None,
        }, path)

    def close(self) -> None:
        """Leave the process group if this trainer joined it."""
        self.ctx.shutdown()

    def add_callback(self, callback) -> None:
        """Call ``callback(trainer)`` after every step (before that step's checkpoint)."""
        self.callbacks.append(callback)

