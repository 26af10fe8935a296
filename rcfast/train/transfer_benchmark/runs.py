"""The training runs of one seed of the transfer benchmark, and a reusable glyph-classifier helper.

Per seed, in order (each a :class:`~rcfast.train.RunConfig`, trained through
``Consolidator.from_config`` like ``rcfast consolidate``):

1. ``teacher_general``: the generalist, cross-entropy on the general domain's
   classes, from scratch;
2. ``teacher_<script>``: one specialist per specialist script, fine-tuned from
   the generalist's weights (``student.init_from``) on that script's classes;
3. students on the unlabeled proxy images, initialised from the generalist
   (or at random): ``single_kd`` (a: the first specialist alone),
   ``repcon`` (b: every specialist head + the generalist head), ``multi_kd``
   (c: every specialist head, no generalist);
4. ``oracle`` (d): multi-task cross-entropy on the teachers' own labeled data.

:func:`train_glyph_classifier` trains one classifier on a glyph data set with
the same recipe, for other experiments (OT teacher selection, IE-KD, DMC).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from rcfast.data.glyphs import GlyphDataset
from rcfast.data.glyphs.protocol import ProtocolData, script_slug
from rcfast.train.config import RunConfig, TaskConfig
from rcfast.train.experiment import RunRecipe, labeled_images, load_backbone, load_classifier, train_runs
from rcfast.train.transfer_benchmark.settings import BenchmarkSettings

__all__ = ["GENERALIST", "STUDENTS", "GlyphClassifier", "model_labels", "recipe_for", "seed_configs",
           "train_glyph_classifier"]

GENERALIST = "general"  # the generalist's task, teacher and head name
STUDENTS = ("single_kd", "repcon", "multi_kd", "oracle")
CHECKPOINTS_PER_RUN = 4  # an interrupted benchmark resumes a run from its last quarter at most


def recipe_for(settings: BenchmarkSettings, seed: int, backbone: str = "small_cnn") -> RunRecipe:
    """The benchmark's run settings for ``seed`` (every run of the seed shares them)."""
    return RunRecipe(backbone=backbone, width=settings.width, batch_size=settings.batch_size, lr=settings.lr,
                     seed=seed, image_size=settings.protocol.image_size, data_backend=settings.data_backend,
                     num_threads=settings.data_threads, precision=settings.precision, resume="auto")


def _with_checkpoints(config: RunConfig) -> RunConfig:
    config.train.checkpoint_every = max(1, config.train.max_steps // CHECKPOINTS_PER_RUN)
    return config


def seed_configs(data: ProtocolData, settings: BenchmarkSettings, seed: int, runs_dir: Path) -> dict[str, RunConfig]:
    """``{run name: RunConfig}`` of one seed, teachers first (later runs read their ``final.pt``)."""
    recipe = recipe_for(settings, seed)
    tasks = {name: TaskConfig(name, ds.splits["train"], len(ds.classes)) for name, ds in data.teacher_tasks.items()}
    specialists = [script_slug(s) for s in data.classes.specialists]
    final = {name: runs_dir / f"teacher_{name}" / "final.pt" for name in tasks}

    configs = {f"teacher_{GENERALIST}": recipe.classifier_run(tasks[GENERALIST], runs_dir / f"teacher_{GENERALIST}",
                                                              settings.generalist_steps)}
    for name in specialists:
        configs[f"teacher_{name}"] = recipe.classifier_run(tasks[name], runs_dir / f"teacher_{name}",
                                                           settings.specialist_steps, init_from=final[GENERALIST],
                                                           lr=settings.specialist_lr)

    def teacher(name: str):
        return recipe.teacher(name, final[name], tasks[name].num_classes, generalist=name == GENERALIST)

    init = final[GENERALIST] if settings.student_init == "generalist" else ""
    students = {"single_kd": specialists[:1], "repcon": specialists + [GENERALIST], "multi_kd": specialists}
    for name, teachers in students.items():
        configs[name] = recipe.distill_run([teacher(t) for t in teachers], data.proxy_folder, runs_dir / name,
                                           settings.student_steps, settings.temperature, init_from=init)
    configs["oracle"] = recipe.multitask_run([tasks[GENERALIST]] + [tasks[s] for s in specialists],
                                             runs_dir / "oracle", settings.student_steps, init_from=init)
    return {name: _with_checkpoints(config) for name, config in configs.items()}


def model_labels(specialist_scripts, student_init: str = "generalist") -> dict[str, str]:
    """Display names of the evaluated models, in table order."""
    first, names = specialist_scripts[0], "+".join(specialist_scripts)
    init = "" if student_init == "generalist" else ", random init"
    labels = {"random_init": "random init (reference)", f"teacher_{GENERALIST}": "generalist teacher"}
    labels.update({f"teacher_{script_slug(s)}": f"specialist teacher: {s}" for s in specialist_scripts})
    labels.update({
        "single_kd": f"(a) single-head KD: {first}{init}",
        "repcon": f"(b) RepCon: {names}+generalist{init}",
        "multi_kd": f"(c) multi-head KD: {names}{init}",
        "oracle": f"(d) oracle: multi-task labels{init}",
    })
    return labels


# ---------------------------------------------------------------------------------------------
# A reusable piece: one small classifier on a glyph data set


@dataclass
class GlyphClassifier:
    """A classifier trained by :func:`train_glyph_classifier`: its ``final.pt`` and how to rebuild it."""

    checkpoint: Path
    classes: list[str]
    recipe: RunRecipe
    summary: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def model(self) -> nn.Module:
        """The classifier (images -> ``[B, num_classes]`` logits; label ``i`` is ``classes[i]``)."""
        return load_classifier(self.checkpoint, self.num_classes, self.recipe.backbone, width=self.recipe.width)

    def backbone(self) -> nn.Module:
        """Its feature extractor (images -> ``[B, feature_dim]``)."""
        return load_backbone(self.checkpoint, self.recipe.backbone, width=self.recipe.width)

    def accuracy(self, dataset: GlyphDataset, split: str = "test") -> float:
        """Top-1 accuracy on a split of ``dataset`` (which must have the same classes)."""
        from rcfast.eval import classifier_accuracy

        if list(dataset.classes) != list(self.classes):
            raise ValueError("dataset: its classes differ from the classifier's")
        return classifier_accuracy(self.model(), labeled_images(dataset.splits[split], self.recipe.image_size,
                                                                self.recipe.data_backend, self.recipe.num_threads))


def train_glyph_classifier(dataset: GlyphDataset, out_dir, steps: int, *, split: str = "train",
                           recipe: RunRecipe | None = None, init_from="", lr: float | None = None,
                           name: str = "glyphs", log: Callable[[str], None] = print) -> GlyphClassifier:
    """Train a small classifier (cross-entropy) on ``dataset``'s ``split``; a finished run in ``out_dir`` is kept.

    ``recipe`` defaults to the transfer benchmark's (``small_cnn``, width 16,
    batch 64, AdamW 2e-3, warm-up + cosine) at the data set's image size;
    ``init_from`` fine-tunes from another run's ``final.pt``. The run is a
    normal ``rcfast consolidate`` run (``out_dir/config.yaml``, metrics,
    checkpoints, ``final.pt``); an interrupted one resumes.
    """
    if not isinstance(dataset, GlyphDataset) or not dataset.labeled:
        raise TypeError("dataset must be a labeled GlyphDataset (from glyph_dataset or protocol_data)")
    if split not in dataset.splits:
        raise ValueError(f"split {split!r} is not one of the data set's splits {sorted(dataset.splits)}")
    if recipe is None:
        recipe = RunRecipe(image_size=dataset.manifest["spec"]["render"]["image_size"], resume="auto")
    task = TaskConfig(name, dataset.splits[split], len(dataset.classes))
    config = _with_checkpoints(recipe.classifier_run(task, Path(out_dir), steps, init_from=init_from, lr=lr))
    summary = train_runs({name: config}, None, fresh=False, log=log, label="glyph classifier")[name]
    return GlyphClassifier(Path(out_dir) / "final.pt", list(dataset.classes), recipe, summary)
