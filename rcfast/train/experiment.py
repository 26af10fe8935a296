"""The machinery rcfast's end-to-end experiments share (the digits demo, the glyph transfer benchmark).

An experiment describes each of its runs as a :class:`~rcfast.train.RunConfig`
built from one :class:`RunRecipe` (backbone, batch, optimiser, precision: the
knobs every run shares), runs them exactly as ``rcfast consolidate`` would --
the config written to YAML, read back, ``Consolidator.from_config`` -- with
:func:`train_runs`, then scores frozen backbones (:func:`load_backbone`,
:func:`load_classifier`, :func:`labeled_images`) with :mod:`rcfast.eval`.

The three kinds of run:

- :meth:`RunRecipe.classifier_run`: one labeled task, ``cross_entropy`` (a
  teacher, possibly fine-tuned from another run's weights via ``init_from``);
- :meth:`RunRecipe.distill_run`: ``multihead_kd`` of named teachers on
  unlabeled proxy images (single-head KD, multi-head KD, RepCon);
- :meth:`RunRecipe.multitask_run`: one ``cross_entropy`` term per labeled
  task (the multi-task oracle), the batch split over the tasks.
"""
from __future__ import annotations

import json
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from torch import nn

from rcfast.models import build_classifier, build_model
from rcfast.atomic import atomic_write_json
from rcfast.train.checkpoint import load_checkpoint
from rcfast.train.config import (DataConfig, OptimConfig, RunConfig, StudentConfig, TaskConfig, TeacherConfig,
                                 TrainConfig, dump_config, load_config)
from rcfast.train.consolidator import Consolidator
from rcfast.train.teachers import extract_model_state

__all__ = ["RunRecipe", "train_runs", "load_backbone", "load_classifier", "labeled_images", "cpu_seconds"]

SUMMARY = "summary.json"


@dataclass
class RunRecipe:
    """The settings every run of an experiment shares; its methods build the runs' configs.

    ``resume="auto"`` with ``checkpoint_every > 0`` lets an interrupted
    experiment continue each run exactly where it stopped.
    """

    backbone: str = "small_cnn"
    width: int = 16
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0
    image_size: int = 32
    data_backend: str = "auto"
    num_threads: int = 1
    precision: str = "fp32"
    checkpoint_every: int = 0
    resume: str = "none"
    progress: bool = True

    # ---------------------------------------------------------------- config parts
    def data(self, source: str = "", batch_size: int | None = None) -> DataConfig:
        # Images are used as they are (no crops or flips: a flipped glyph or digit is
        # another symbol); batches are reshuffled every epoch.
        return DataConfig(source=source, image_size=self.image_size, batch_size=batch_size or self.batch_size,
                          augment="none", shuffle=True, backend=self.data_backend,
                          num_threads=self.num_threads, drop_last=True)

    def train(self, out: str | Path, steps: int) -> TrainConfig:
        return TrainConfig(max_steps=steps, precision=self.precision, seed=self.seed,
                           log_every=max(1, steps // 10), checkpoint_every=self.checkpoint_every,
                           keep_checkpoints=1, out_dir=str(out), resume=self.resume, progress=self.progress)

    def optim(self, steps: int, lr: float | None = None) -> OptimConfig:
        return OptimConfig(name="adamw", lr=self.lr if lr is None else lr, weight_decay=self.weight_decay,
                           warmup_steps=max(1, steps // 10), clip_grad_norm=1.0)

    def student(self, init_from: str | Path = "") -> StudentConfig:
        return StudentConfig(backbone=self.backbone, backbone_kwargs={"width": self.width},
                             init_from=str(init_from) if init_from else "")

    def teacher(self, name: str, checkpoint: str | Path, num_classes: int, generalist: bool = False) -> TeacherConfig:
        """A teacher trained by one of this recipe's runs (its ``final.pt``)."""
        return TeacherConfig(name=name, builder=self.backbone, num_classes=num_classes, checkpoint=str(checkpoint),
                             builder_kwargs={"width": self.width}, generalist=generalist)

    # ---------------------------------------------------------------- whole runs
    def classifier_run(self, task: TaskConfig, out: str | Path, steps: int, init_from: str | Path = "",
                       lr: float | None = None) -> RunConfig:
        """Train a classifier (a teacher) on one labeled task with cross-entropy."""
        return RunConfig(student=self.student(init_from), tasks=[task], data=self.data(),
                         objective=[{"term": "cross_entropy", "head": task.name}],
                         optim=self.optim(steps, lr), train=self.train(out, steps))

    def distill_run(self, teachers: Sequence[TeacherConfig], proxy: str | Path, out: str | Path, steps: int,
                    temperature: float, init_from: str | Path = "", lr: float | None = None) -> RunConfig:
        """Distil ``teachers`` (one student head each) on unlabeled proxy images."""
        return RunConfig(student=self.student(init_from), teachers=list(teachers), data=self.data(str(proxy)),
                         objective=[{"term": "multihead_kd", "temperature": temperature}],
                         optim=self.optim(steps, lr), train=self.train(out, steps))

    def multitask_run(self, tasks: Sequence[TaskConfig], out: str | Path, steps: int, init_from: str | Path = "",
                      lr: float | None = None) -> RunConfig:
        """Multi-task training with labels, one head and one ``cross_entropy`` term per task.

        Each task stream yields one batch per step; splitting the batch size
        over the tasks gives it as many images per step as the other runs.
        """
        return RunConfig(student=self.student(init_from), tasks=list(tasks),
                         objective=[{"term": "cross_entropy", "head": task.name} for task in tasks],
                         data=self.data(batch_size=max(1, self.batch_size // len(tasks))),
                         optim=self.optim(steps, lr), train=self.train(out, steps))


def _finished_summary(config: RunConfig) -> dict | None:
    """The summary of a finished run of exactly ``config``, or None."""
    out = Path(config.train.out_dir)
    try:
        summary = json.loads((out / SUMMARY).read_text())
        done = (out / "config.yaml").read_text() == dump_config(config) and (out / "final.pt").is_file()
    except (OSError, ValueError):
        return None
    return summary if done and isinstance(summary, dict) else None


def train_runs(configs: Mapping[str, RunConfig], config_dir: str | Path | None, *, fresh: bool,
               log: Callable[[str], None] = print, label: str = "run") -> dict[str, dict]:
    """Train each config in order, as ``rcfast consolidate --config <config_dir>/<name>.yaml`` would.

    ``config_dir=None`` keeps each config only in its run folder
    (``<out_dir>/config.yaml``, the file the trainer writes there anyway).
    ``fresh=True`` deletes each run's ``out_dir`` first (a rerun starts from
    scratch). ``fresh=False`` keeps finished runs: a run whose ``out_dir``
    holds ``final.pt``, the same ``config.yaml`` and a ``summary.json`` is not
    trained again, and an interrupted one resumes per ``train.resume``.
    Returns ``{name: Consolidator.fit() summary}``, plus ``cpu_time_s``: the
    CPU time the run took in this process (building it included).
    """
    summaries = {}
    for name, config in configs.items():
        run_dir = Path(config.train.out_dir)
        if fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        finished = None if fresh else _finished_summary(config)
        if finished is not None:
            summaries[name] = finished
            log(f"[{label}] {name}: finished earlier ({finished['steps']} steps), kept")
            continue
        folder = Path(config_dir) if config_dir is not None else run_dir
        folder.mkdir(parents=True, exist_ok=True)
        config_path = folder / (f"{name}.yaml" if config_dir is not None else "config.yaml")
        dump_config(config, config_path)
        log(f"[{label}] {name}: rcfast consolidate --config {config_path}")
        cpu = cpu_seconds()
        trainer = Consolidator.from_config(load_config(config_path))
        try:
            summary = trainer.fit()
        finally:
            trainer.close()
        summary["cpu_time_s"] = cpu_seconds() - cpu  # this process, all its threads: building and training
        summaries[name] = summary
        atomic_write_json(run_dir / SUMMARY, summary)  # written last: its presence marks the run finished
        log(f"[{label}] {name}: {summary['steps']} steps, loss {summary['loss']:.4f}, "
            f"{summary['images_per_sec']:.0f} images/s")
    return summaries


def cpu_seconds() -> float:
    """CPU time (user + system) of this process so far, all threads (torch's, DALI's) included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _model_state(path: str | Path) -> dict:
    return extract_model_state(load_checkpoint(path))  # weights only, content hash verified


def load_backbone(path: str | Path, backbone: str, **backbone_kwargs) -> nn.Module:
    """The backbone of a run's ``final.pt`` (a student's, an oracle's or a teacher's), ready to evaluate."""
    model = build_model(backbone, **backbone_kwargs)
    state = _model_state(path)
    model.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    return model


def load_classifier(path: str | Path, num_classes: int, backbone: str, **backbone_kwargs) -> nn.Module:
    """A one-head run's ``final.pt`` (a teacher) as a classifier, images -> ``[B, num_classes]``."""
    model = build_classifier(backbone, num_classes, **backbone_kwargs)
    model.load_state_dict(_model_state(path))
    return model


def labeled_images(folder: str | Path, image_size: int, backend: str = "auto", num_threads: int = 1,
                   batch_size: int = 256):
    """A labeled class-folder split read for evaluation: every image once, in file order, no augmentation."""
    from rcfast.data import ProxyImages

    return ProxyImages(str(folder), image_size=image_size, batch_size=batch_size, device="cpu", augment="none",
                       labels=True, drop_last=False, shuffle=False, backend=backend, num_threads=num_threads)
