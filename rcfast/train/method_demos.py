"""What the IE-KD and DMC demos share: labeled image lists, config-driven runs, accuracy, seed statistics.

Both demos run on ten classes, split the same way (:class:`TaskLists`): a
labeled training pool whose two halves are ``teacher_train`` and ``auxiliary``
(the latter used unlabeled by DMC), and a test set no model trains on. Lists are
``path label`` files that ``ProxyImages`` reads with these global labels.
Nothing downloads. Two data sets (``data=``):

- ``"digits"`` (default): scikit-learn's handwritten digits as written by
  :func:`rcfast.data.demo_dataset`, every plain rendering labeled with its digit
  again (a file is named by its index in ``load_digits()``): ``teacher_train``
  = ``teacher_all/train`` (576), ``auxiliary`` = ``proxy`` (629), ``test`` =
  ``teacher_all/test`` and ``downstream/parity`` (592);
- ``"glyphs"``: ten classes of one script of :mod:`rcfast.data.glyphs`
  (characters rendered from matplotlib's fonts over varied backgrounds; the
  first ten of ``split_classes(script, ...)``), 60 images per class in each of
  ``teacher_train``, ``auxiliary`` and ``test``.

Every run is a YAML config under ``<out>/configs`` trained by
``Consolidator.from_config`` -- what ``rcfast consolidate --config`` does.
"""
from __future__ import annotations

import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from rcfast.models import build_classifier
from rcfast.train.checkpoint import isolated_rng, seed_everything
from rcfast.train.config import config_from_dict, dump_config, load_config
from rcfast.train.consolidator import Consolidator
from rcfast.train.teachers import extract_model_state

__all__ = ["BACKBONE", "FEATURE_LAYER", "DATA_SETS", "RunSettings", "DemoDirs", "TaskLists", "start_demo", "digit_lists",
           "glyph_lists", "task_lists", "write_list",
           "test_images", "run_dict",
           "teacher_entry", "run_config", "load_classifier", "predict", "accuracy", "mean_std", "format_mean_std"]

Item = tuple[str, int]  # (image path, label)

BACKBONE = "small_cnn"
FEATURE_LAYER = "backbone.body.13"
"""small_cnn's last activation, ``[B, 4 * width, S / 4, S / 4]``: IE-KD's feature map (an activation module,
so no in-place op overwrites what the hook captured)."""


@dataclass
class RunSettings:
    """Settings every run of a demo shares."""

    image_size: int = 16
    batch_size: int = 50
    lr: float = 2e-3
    data_backend: str = "auto"
    data_threads: int = 1


DATA_SETS = ("digits", "glyphs")
GLYPH_SCRIPT = "Georgian"
GLYPHS_PER_SPLIT = 60


@dataclass
class TaskLists:
    """A ten-class task as labeled images ``(path, label)``, see the module docstring."""

    description: str
    names: list[str]
    teacher_train: list[Item]
    auxiliary: list[Item]
    test: list[Item]
    auxiliary_folder: str

    @property
    def pool(self) -> list[Item]:
        return sorted(self.teacher_train + self.auxiliary)


def _labeled(folder: Path, label_of) -> list[Item]:
    return sorted((str(p), int(label_of(p))) for p in Path(folder).rglob("*.png"))


def digit_lists(root: str | Path) -> TaskLists:
    """The digits under ``root`` (written by ``demo_dataset`` on first use), relabeled by digit."""
    from sklearn.datasets import load_digits

    from rcfast.data import demo_dataset

    manifest = demo_dataset(root)
    targets = load_digits().target
    root = Path(manifest["root"])

    def digit(path: Path) -> int:  # file names are indices into load_digits()
        return targets[int(path.stem)]

    test = (_labeled(root / "teacher_all" / "test", digit)
            + _labeled(Path(manifest["downstream"]["parity"]["train"]).parent, digit))
    return TaskLists(description="scikit-learn's handwritten digits", names=[str(d) for d in range(10)],
                     teacher_train=_labeled(root / "teacher_all" / "train", digit),
                     auxiliary=_labeled(root / "proxy", digit), test=sorted(test),
                     auxiliary_folder=manifest["proxy"]["path"])


def glyph_lists(root: str | Path, script: str = GLYPH_SCRIPT, seed: int = 0) -> TaskLists:
    """Ten glyph classes of ``script`` under ``root`` (rendered on first use), in three splits of 60 per class."""
    from rcfast.data.glyphs import available_scripts, glyph_dataset, split_classes

    total = available_scripts()[script]
    classes, _ = split_classes(script, [10, total - 10], seed=seed)
    ds = glyph_dataset(root, classes, splits={split: GLYPHS_PER_SPLIT for split in ("train", "auxiliary", "test")},
                       seed=seed)
    index = {cid: i for i, cid in enumerate(ds.classes)}

    def label(path: Path) -> int:  # class folders are class ids
        return index[path.parent.name]

    return TaskLists(description=f"ten {script} glyph classes ({' '.join(ds.chars)}) of rcfast.data.glyphs",
                     names=list(ds.chars), teacher_train=_labeled(ds.splits["train"], label),
                     auxiliary=_labeled(ds.splits["auxiliary"], label), test=_labeled(ds.splits["test"], label),
                     auxiliary_folder=ds.splits["auxiliary"])


def task_lists(data: str, root: str | Path) -> TaskLists:
    """The ten-class task ``data`` (``"digits"`` or ``"glyphs"``) written under ``root``."""
    from rcfast.extras import require

    if data not in DATA_SETS:
        raise ValueError(f"data must be one of {DATA_SETS}, got {data!r}")
    require(f"the {data} task of the IE-KD/DMC demos", "sklearn", "PIL", "yaml")  # before any work
    return digit_lists(root) if data == "digits" else glyph_lists(root)


@dataclass
class DemoDirs:
    """A demo's output folder: ``runs/`` (one per run), ``configs/`` (their YAML), ``lists/`` (image lists)."""

    out: Path
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        """Seconds since the demo started."""
        return time.perf_counter() - self.started

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def configs(self) -> Path:
        return self.out / "configs"

    @property
    def lists(self) -> Path:
        return self.out / "lists"


def write_list(path: str | Path, items: Sequence[Item], classes: Sequence[int] | None = None,
               relabel: bool = False) -> str:
    """Write ``path label`` lines of the items whose label is in ``classes`` (all ten by default).

    ``relabel``: label each image by its label's position in ``classes`` (a model
    over those classes only) instead of by its global label.
    """
    keep = list(range(10)) if classes is None else list(classes)
    lines = [f"{p} {keep.index(d) if relabel else d}" for p, d in items if d in keep]
    if not lines:
        raise ValueError(f"no image of the classes {keep} to list in {path}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
    return str(path)


def test_images(task: TaskLists, lists_dir: Path, settings: "RunSettings"):
    """The test images (global labels) as a ``ProxyImages`` pipeline, in file order."""
    from rcfast.data import ProxyImages

    return ProxyImages(write_list(lists_dir / "test.txt", task.test), image_size=settings.image_size,
                       batch_size=256, device="cpu", augment="none", labels=True, shuffle=False, drop_last=False,
                       backend=settings.data_backend, num_threads=settings.data_threads)


def start_demo(out_dir: str | Path, data: str, settings: RunSettings,
               data_root: str | Path | None = None) -> tuple[DemoDirs, TaskLists, object]:
    """A demo's output folders, its task (written once under ``data_root``, default ``<out_dir>/data``) and test images."""
    dirs = DemoDirs(Path(out_dir).resolve())
    task = task_lists(data, data_root if data_root is not None else dirs.out / "data")
    return dirs, task, test_images(task, dirs.lists, settings)


def run_dict(settings: RunSettings, *, out_dir: Path, seed: int, steps: int, source: str, heads: dict,
             width: int, objective: list, teachers: Sequence[dict] = (), labels: bool = True) -> dict:
    """One run's config as a plain dict (YAML-ready): a ``small_cnn`` student of ``width``, AdamW, cosine."""
    return {
        "student": {"backbone": BACKBONE, "backbone_kwargs": {"width": width}, "heads": dict(heads)},
        "teachers": list(teachers),
        # Digits and glyphs are centred, and a mirrored character is another one: no crops or flips.
        "data": {"source": source, "labels": labels, "image_size": settings.image_size,
                 "batch_size": settings.batch_size, "augment": "none", "shuffle": True, "drop_last": True,
                 "backend": settings.data_backend, "num_threads": settings.data_threads},
        "objective": objective,
        "optim": {"name": "adamw", "lr": settings.lr, "weight_decay": 0.05, "warmup_steps": max(1, steps // 10),
                  "clip_grad_norm": 1.0},
        "train": {"max_steps": steps, "seed": seed, "log_every": max(1, steps // 10), "checkpoint_every": 0,
                  "out_dir": str(out_dir), "resume": "none", "progress": False},
    }


def teacher_entry(name: str, final_path: Path, num_classes: int, width: int) -> dict:
    """A ``teachers:`` entry for a demo model trained earlier (its ``final.pt``)."""
    return {"name": name, "builder": BACKBONE, "checkpoint": str(final_path), "num_classes": num_classes,
            "builder_kwargs": {"width": width}}


def run_config(config: dict, configs_dir: Path, name: str, log: Callable[[str], None] = print,
               prepare: Callable[[Consolidator], None] | None = None) -> dict:
    """Train ``config`` (a plain dict) as ``rcfast consolidate`` would; return ``fit()``'s summary.

    The config is validated, written to ``configs_dir/<name>.yaml`` and read
    back. The run's ``out_dir`` belongs to the demo: a rerun starts it afresh.
    ``prepare(trainer)`` may change the built trainer (e.g. initial weights a
    config cannot express) before training.
    """
    path = configs_dir / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    dump_config(config_from_dict(config), path)
    run_dir = Path(config["train"]["out_dir"])
    if run_dir.exists():
        shutil.rmtree(run_dir)
    log(f"[demo] {name}: rcfast consolidate --config {path}")
    trainer = Consolidator.from_config(load_config(path))
    try:
        if prepare is not None:
            prepare(trainer)
        summary = trainer.fit()
    finally:
        trainer.close()
    log(f"[demo] {name}: {summary['steps']} steps, loss {summary['loss']:.4f}, {summary['wall_time_s']:.1f} s")
    return summary


def load_classifier(final_path: str | Path, backbone: str, num_classes: int, backbone_kwargs: dict) -> nn.Module:
    """A trained classifier (``final.pt`` of a one-head run), in eval mode."""
    with isolated_rng():
        seed_everything(0)  # the weights are overwritten; only keep the caller's RNG untouched
        model = build_classifier(backbone, num_classes, **backbone_kwargs)
    model.load_state_dict(extract_model_state(torch.load(final_path, map_location="cpu", weights_only=True)))
    return model.eval()


def predict(model: nn.Module, data) -> tuple[torch.Tensor, torch.Tensor]:
    """``(argmax predictions, labels)`` of ``model`` over labeled batches, in eval mode."""
    was_training = model.training
    model.eval()
    predictions, labels = [], []
    try:
        with torch.inference_mode():
            for images, batch_labels in data:
                predictions.append(model(images).argmax(dim=1).cpu())
                labels.append(batch_labels.cpu())
    finally:
        model.train(was_training)
    return torch.cat(predictions), torch.cat(labels)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor, classes: Sequence[int] | None = None,
             among: Sequence[int] | None = None) -> float:
    """Top-1 accuracy; ``classes[i]`` is the global label of output ``i`` (a model over a subset).

    ``among``: only the images whose label is in ``among`` (e.g. the old classes).
    """
    if classes is not None:
        predictions = torch.as_tensor(list(classes))[predictions]
    if among is not None:
        keep = torch.isin(labels, torch.as_tensor(list(among)))
        predictions, labels = predictions[keep], labels[keep]
    if labels.numel() == 0:
        raise ValueError("no image to score")
    return float((predictions == labels).float().mean())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_mean_std(values: Sequence[float], scale: float = 100.0) -> str:
    """``"91.2 ± 0.8"`` (percent by default)."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "-"
    return f"{scale * mean:.1f} ± {scale * std:.1f}"
