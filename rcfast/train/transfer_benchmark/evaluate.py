"""Scoring one seed: frozen backbones, few-shot linear probes and kNN on the downstream tasks.

Every backbone (a seeded random one, the teachers', the students', the
oracle's) is frozen; its features of each downstream task's ``train`` and
``test`` images are extracted once. For each shot count n, the probe and kNN
are fitted on the first n training images of each class (image indices 0..n-1:
the 5-shot set is part of the 20-shot set) and scored on every test image:

- ``probe@n``: :func:`rcfast.eval.linear_probe` (standardised features,
  multinomial logistic regression) with one fixed C (``probe_C``) for every
  backbone and task. Choosing C on a validation part of a few-shot set (one
  to four images per class) picks C by noise: the choice moved test accuracy
  by 2-3 points between runs of the same features, more than the effects the
  claims are about;
- ``knn@n``: :func:`rcfast.eval.knn_accuracy`, cosine, k = min(``knn_k``, n).

The teachers are also scored as classifiers on their own tasks' test splits.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from rcfast.data.glyphs.protocol import ProtocolData
from rcfast.eval import classifier_accuracy, extract_features, knn_accuracy, linear_probe
from rcfast.models import build_model
from rcfast.train.checkpoint import isolated_rng, seed_everything
from rcfast.train.experiment import RunRecipe, labeled_images, load_backbone, load_classifier
from rcfast.train.transfer_benchmark.runs import STUDENTS
from rcfast.train.transfer_benchmark.settings import BenchmarkSettings

__all__ = ["first_per_class", "seed_backbones", "evaluate_seed", "score_backbones"]


def first_per_class(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first ``n`` samples of each class, in order (ValueError if a class has fewer)."""
    counts = np.zeros(int(labels.max()) + 1, dtype=np.int64)
    keep = []
    for i, label in enumerate(labels):
        if counts[label] < n:
            keep.append(i)
            counts[label] += 1
    if counts.min() < n:
        raise ValueError(f"a class has only {int(counts.min())} training images, fewer than the {n} shots asked")
    return np.asarray(keep, dtype=np.int64)


def seed_backbones(data: ProtocolData, summaries: dict[str, dict], recipe: RunRecipe,
                   seed: int) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """``({model name: frozen backbone}, {teacher name: accuracy on its own test split})``."""
    with isolated_rng():  # a seeded random backbone, without reseeding the caller's RNG
        seed_everything(seed)
        backbones = {"random_init": build_model(recipe.backbone, width=recipe.width)}
    teacher_accuracy = {}
    for task, dataset in data.teacher_tasks.items():
        name = f"teacher_{task}"
        model = load_classifier(summaries[name]["final"], len(dataset.classes), recipe.backbone, width=recipe.width)
        test = labeled_images(dataset.splits["test"], recipe.image_size, recipe.data_backend, recipe.num_threads)
        teacher_accuracy[name] = classifier_accuracy(model, test)
        backbones[name] = model.backbone
    for name in STUDENTS:
        backbones[name] = load_backbone(summaries[name]["final"], recipe.backbone, width=recipe.width)
    return backbones, teacher_accuracy


def _few_shot(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], shots, knn_k: int,
              C: float, seed: int) -> dict[str, float]:
    scores = {}
    for n in shots:
        keep = first_per_class(train[1], n)
        x, y = train[0][keep], train[1][keep]
        probe = linear_probe(x, y, test[0], test[1], Cs=(C,), seed=seed)  # one C: one fit on all n per class
        scores[f"probe@{n}"] = probe["accuracy"]
        k = min(knn_k, n)
        scores[f"knn@{n}"] = knn_accuracy(x, y, test[0], test[1], k=k)[k]
    return scores


def evaluate_seed(data: ProtocolData, summaries: dict[str, dict], settings: BenchmarkSettings, recipe: RunRecipe,
                  seed: int, log: Callable[[str], None] = print) -> dict:
    """``{"transfer": {model: {task: {"probe@n": acc, "knn@n": acc, ...}}}, "teacher_accuracy": {...}}``."""
    backbones, teacher_accuracy = seed_backbones(data, summaries, recipe, seed)
    return {"transfer": score_backbones(data, backbones, settings, recipe, seed, log),
            "teacher_accuracy": teacher_accuracy}


def score_backbones(data: ProtocolData, backbones: dict[str, nn.Module], settings: BenchmarkSettings,
                    recipe: RunRecipe, seed: int, log: Callable[[str], None] = print) -> dict[str, dict[str, dict]]:
    """``{model: {task: {"probe@n": acc, "knn@n": acc, ...}}}`` of frozen ``backbones`` on the seed's downstream tasks."""
    transfer: dict[str, dict[str, dict]] = {name: {} for name in backbones}
    bar = tqdm(total=len(backbones) * len(data.downstream), desc=f"seed {seed}: probes", unit="probe",
               dynamic_ncols=True)
    try:
        for task, dataset in data.downstream.items():
            # Decoded once per task, then reused for every backbone.
            splits = {split: list(labeled_images(Path(dataset.splits[split]), recipe.image_size,
                                                 recipe.data_backend, recipe.num_threads))
                      for split in ("train", "test")}
            for name, backbone in backbones.items():
                train = extract_features(backbone, splits["train"])
                test = extract_features(backbone, splits["test"])
                transfer[name][task] = _few_shot(train, test, settings.shots, settings.knn_k, settings.probe_C, seed)
                bar.update(1)
            log(f"[benchmark] seed {seed}, {task}: " + ", ".join(
                f"{name} {np.mean([transfer[name][task][f'probe@{n}'] for n in settings.shots]):.3f}"
                for name in backbones))
    finally:
        bar.close()
    return transfer
