"""``Consolidator``: the training loop of representation consolidation.

Two modes share one loop (AMP, fused optimiser, warm-up + cosine schedule,
gradient clipping, tqdm, JSONL metrics, atomic checkpoints with exact resume,
DDP under ``torchrun``):

- ``distill``: the student's packed heads mimic teachers on unlabeled proxy
  images through one call of :func:`rcfast.multihead_kd_loss` (optionally plus
  hard-label cross-entropy on one head when the proxy data has labels). The
  teacher set decides the method: all task teachers + a generalist is RepCon,
  one task teacher is single-head KD, task teachers only is multi-teacher KD.
- ``supervised``: every head is trained with cross-entropy on its own labeled
  task (one batch of each per step, one forward of the concatenation): the
  multi-task "oracle", or a teacher when there is a single task.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rcfast.models import MultiHeadStudent, build_student
from rcfast.ops.multihead_kd import multihead_kd_loss
from rcfast.train.checkpoint import (atomic_save, capture_rng_state, checkpoint_path, latest_checkpoint,
                                     load_checkpoint, prune_checkpoints, restore_rng_state)
from rcfast.train.config import OptimConfig, RunConfig, TrainConfig, config_to_dict, dump_config
from rcfast.train.distributed import DistContext, setup_distributed
from rcfast.train.metrics import MetricsWriter
from rcfast.train.optim import build_optimizer, build_scheduler
from rcfast.train.streams import DataStream
from rcfast.train.teachers import TeacherEnsemble, load_teacher

__all__ = ["Consolidator", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "rcfast.consolidator/1"
_AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _per_head(name: str, value, heads) -> dict[str, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {h: float(value) for h in heads}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a float or a {{head: float}} mapping, got {type(value).__name__}")
    missing = [h for h in heads if h not in value]
    unknown = [k for k in value if k not in heads]
    if missing or unknown:
        raise ValueError(f"{name} must give one value per head {list(heads)} (missing {missing}, unknown {unknown})")
    return {h: float(value[h]) for h in heads}


class Consolidator:
    """Train a :class:`~rcfast.models.MultiHeadStudent` by distillation or supervision.

    Args:
        student: the student; its head names/sizes define the packed layout.
        data: distill mode: the proxy dataset (``ProxyImages`` interface;
            batches of images, or ``(images, labels)`` with ``ce_weight > 0``).
        teachers: distill mode: ``{head_name: nn.Module}`` producing ``[B, C_h]``.
        temperatures, weights: distill mode: one float for all heads or
            ``{head_name: float}``.
        tasks: supervised mode: ``{head_name: labeled dataset}``.
        task_weights: supervised mode: weight of each head's cross-entropy.
        train, optim: loop and optimiser settings.
        run_config: the full config, stored in checkpoints (for ``rcfast eval``).
        dist_context: an existing :class:`DistContext` (default: set one up
            from the ``torchrun`` environment).

    ``fit()`` runs to ``train.max_steps`` (resuming first per ``train.resume``)
    and returns a summary dict.
    """

    def __init__(self, student: MultiHeadStudent, data=None, *, teachers: Mapping[str, nn.Module] | None = None,
                 temperatures: float | Mapping[str, float] = 4.0, weights: float | Mapping[str, float] = 1.0,
                 tasks: Mapping[str, object] | None = None, task_weights: float | Mapping[str, float] = 1.0,
                 train: TrainConfig | None = None, optim: OptimConfig | None = None,
                 run_config: RunConfig | None = None, dist_context: DistContext | None = None) -> None:
        if not isinstance(student, MultiHeadStudent):
            raise TypeError(f"student must be a MultiHeadStudent, got {type(student).__name__}")
        self.train_cfg = train or TrainConfig()
        self.optim_cfg = optim or OptimConfig()
        self.run_config = run_config
        cfg = self.train_cfg
        self.ctx = dist_context or setup_distributed(cfg.device, cfg.dist_backend)
        self.device = self.ctx.device
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        if cfg.deterministic:
            if self.device.type == "cuda":
                # cuBLAS is deterministic only with a fixed workspace (set before its first use).
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        if cfg.precision not in _AMP_DTYPES:
            raise ValueError(f"train.precision must be one of {list(_AMP_DTYPES)}, got {cfg.precision!r}")
        self.amp_dtype = _AMP_DTYPES[cfg.precision]
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("train.precision='fp16' needs a CUDA device (fp16 without a GPU has no "
                             "GradScaler support); use 'bf16' on CPU")

        heads = student.head_names
        self.mode = cfg.mode
        self.streams: dict[str, DataStream] = {}
        if self.mode == "distill":
            if teachers is None or data is None:
                raise ValueError("mode 'distill' needs teachers and data (the proxy dataset)")
            self.temperatures = _per_head("temperatures", temperatures, heads)
            self.weights = _per_head("weights", weights, heads)
            if any(t <= 0 for t in self.temperatures.values()):
                raise ValueError(f"temperatures must be > 0, got {self.temperatures}")
            self.ensemble = TeacherEnsemble(teachers, heads, student.splits, self._autocast).to(self.device)
            self.streams["proxy"] = DataStream("proxy", data)
            if cfg.ce_weight > 0 and cfg.ce_head not in heads:
                raise ValueError(f"train.ce_head must be one of the heads {list(heads)}, got {cfg.ce_head!r}")
        elif self.mode == "supervised":
            if tasks is None:
                raise ValueError("mode 'supervised' needs tasks={head_name: labeled dataset}")
            if list(tasks) != list(heads):
                raise ValueError(f"tasks {list(tasks)} must be the student's heads {list(heads)}, in order")
            self.task_weights = _per_head("task_weights", task_weights, heads)
            for name, dataset in tasks.items():
                self.streams[name] = DataStream(name, dataset)
        else:
            raise ValueError(f"train.mode must be 'distill' or 'supervised', got {self.mode!r}")

        for name, stream in self.streams.items():
            self._check_shard(name, stream.dataset)
        self.student = student.to(self.device)
        if cfg.sync_batchnorm:
            if self.device.type != "cuda":
                raise ValueError("train.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm is GPU-only)")
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
        self.model: nn.Module = self.student
        if self.ctx.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.student, device_ids=device_ids)
        self.optimizer = build_optimizer(self.student, self.optim_cfg, self.device)
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
        """Build student, teachers (from their checkpoints) and ``ProxyImages`` data from a config."""
        from rcfast.data import ProxyImages  # the data pipeline is needed only for config-driven runs

        config.validate()
        t = config.train
        ctx = setup_distributed(t.device, t.dist_backend)
        _seed_everything(t.seed)  # same initial student on every rank (DDP also broadcasts it)
        if t.mode == "distill":
            heads = {tc.name: tc.num_classes for tc in config.teachers}
        else:
            heads = {task.name: task.num_classes for task in config.tasks}
        student = build_student(config.student.backbone, heads, **config.student.backbone_kwargs)
        d = config.data

        def proxy(source: str, labels: bool) -> ProxyImages:
            if not Path(source).exists():
                raise FileNotFoundError(f"data source {source} does not exist")
            return ProxyImages(source, image_size=d.image_size, batch_size=d.batch_size,
                               device=str(ctx.device), seed=t.seed, augment=d.augment, labels=labels,
                               drop_last=d.drop_last, backend=d.backend, num_threads=d.num_threads,
                               shuffle=d.shuffle)

        if t.mode == "distill":
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
            return cls(student, proxy(d.source, labels=d.labels), teachers=teachers,
                       temperatures={tc.name: tc.temperature for tc in config.teachers},
                       weights={tc.name: tc.weight for tc in config.teachers},
                       train=t, optim=config.optim, run_config=config, dist_context=ctx)
        tasks = {task.name: proxy(task.source, labels=True) for task in config.tasks}
        return cls(student, tasks=tasks, task_weights={task.name: task.weight for task in config.tasks},
                   train=t, optim=config.optim, run_config=config, dist_context=ctx)

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

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)

    def _distill_loss(self):
        batch = self.streams["proxy"].next()
        labels = None
        if isinstance(batch, (tuple, list)):
            images, labels = batch
        else:
            images = batch
        images = self._to_device(images)
        teacher_logits = self.ensemble(images)
        with self._autocast():
            student_logits = self.model(images)
        heads = self.student.head_names
        loss = multihead_kd_loss(student_logits, teacher_logits, splits=self.student.splits,
                                 temperature=[self.temperatures[h] for h in heads],
                                 weights=[self.weights[h] for h in heads],
                                 reduction="batchmean", backend=self.train_cfg.loss_backend)
        if self.train_cfg.ce_weight > 0:
            if labels is None:
                raise ValueError("train.ce_weight > 0 but the proxy data yields no labels (data.labels: true)")
            cols = self.student.head_slices()[self.train_cfg.ce_head]
            loss = loss + self.train_cfg.ce_weight * F.cross_entropy(
                student_logits[:, cols].float(), self._to_device(labels))
        return loss, images.shape[0], (student_logits, teacher_logits)

    def _supervised_loss(self):
        batches = [self.streams[name].next() for name in self.student.head_names]
        for name, batch in zip(self.student.head_names, batches):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(f"task {name!r} must yield (images, labels) batches")
        # One forward over all tasks' images: every head's GEMM is the one packed GEMM.
        images = self._to_device(torch.cat([b[0] for b in batches]))
        with self._autocast():
            logits = self.model(images)
        loss, row = 0.0, 0
        head_losses = {}
        for name, cols, (task_images, labels) in zip(self.student.head_names, self.student.head_slices().values(),
                                                     batches):
            rows = slice(row, row + task_images.shape[0])
            row += task_images.shape[0]
            head_loss = F.cross_entropy(logits[rows, cols].float(), self._to_device(labels))
            head_losses[name] = head_loss.detach()
            loss = loss + self.task_weights[name] * head_loss
        return loss, images.shape[0], head_losses

    @torch.no_grad()
    def _head_losses(self, extra) -> dict[str, torch.Tensor]:
        """Per-head losses for logging; computed only on logging steps."""
        if self.mode == "supervised":
            return extra
        student_logits, teacher_logits = extra
        out = {}
        for name, cols in self.student.head_slices().items():
            out[name] = multihead_kd_loss(student_logits[:, cols], teacher_logits[:, cols],
                                          temperature=self.temperatures[name], weights=[self.weights[name]],
                                          backend=self.train_cfg.loss_backend)
        return out

    def train_step(self):
        """One optimiser step; returns ``(loss, images_in_this_rank's_batch, extra)``."""
        self.model.train()
        loss, batch_images, extra = self._distill_loss() if self.mode == "distill" else self._supervised_loss()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.optim_cfg.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.student.parameters(), self.optim_cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return loss, batch_images, extra

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
        """
        cfg = self.train_cfg
        resumed_from = self._resume_path()
        if resumed_from is not None:
            self.load_state_dict(load_checkpoint(resumed_from, map_location="cpu"))
        else:
            _seed_everything(cfg.seed + self.ctx.rank)
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temp_files()
            if self.run_config is not None:
                dump_config(self.run_config, self.out_dir / "config.yaml")
            self.metrics.truncate_after(self.step)
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.ctx.is_main), desc=f"rcfast {self.mode}")
        last_loss = float("nan")
        run_start = interval_start = time.perf_counter()
        interval_images = total_images = 0
        last_saved = self.step if resumed_from is not None else None
        try:
            while self.step < cfg.max_steps:
                loss, batch_images, extra = self.train_step()
                interval_images += batch_images * self.ctx.world_size
                total_images += batch_images * self.ctx.world_size
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    elapsed = time.perf_counter() - interval_start
                    heads = self._head_losses(extra)
                    values = self.ctx.mean(torch.stack([loss.detach().float()] +
                                                       [v.float() for v in heads.values()])).tolist()
                    last_loss = values[0]
                    # Checked here, where the loss is on the host anyway: a per-step check
                    # would synchronise a GPU every step.
                    if not math.isfinite(last_loss) and not self.scaler.is_enabled():
                        raise FloatingPointError(f"loss is {last_loss} at step {self.step}")
                    record = {"step": self.step, "loss": values[0],
                              "head_loss": dict(zip(heads.keys(), values[1:])),
                              "lr": self.scheduler.get_last_lr()[0],
                              "images_per_sec": interval_images / max(elapsed, 1e-9),
                              "epoch": {n: s.epoch for n, s in self.streams.items()}}
                    bar.set_postfix(loss=f"{values[0]:.4f}", img_s=f"{record['images_per_sec']:.0f}")
                    if self.metrics is not None:
                        self.metrics.write(record)
                    interval_start, interval_images = time.perf_counter(), 0
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

