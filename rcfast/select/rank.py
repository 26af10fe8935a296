"""``rank_teachers``: order a repository of teachers by relatedness to a labeled target sample.

Each teacher runs once over the sample (batched, ``eval()``, inference mode);
its features, logits and classifier weight give the prototype cost matrix and
the chosen score. No student is trained.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from rcfast.extras import require
from rcfast.select.cost import METRICS, prototype_cost
from rcfast.select.outputs import check_labels, classifier_outputs, final_linear
from rcfast.select.scores import LINEAR_PROBE_MODULES, leep_score, linear_probe_score, ot_score

__all__ = ["TeacherScore", "METHODS", "rank_teachers"]

#: scoring methods and whether a higher score means a more related teacher
METHODS = {"ot": False, "leep": True, "linear_probe": True}


@dataclass
class TeacherScore:
    """One teacher's result.

    Attributes:
        name: the teacher's key in the ``teachers`` mapping.
        score: the method's score (``ot``: transport cost, lower is better;
            ``leep``/``linear_probe``: higher is better).
        method: the scoring method.
        rank: 1 for the most related teacher.
        cost_matrix: ``[C_teacher, C_target]`` prototype costs (for inspection;
            the cost the ``ot`` score and ``ot_distill`` use).
        seconds: wall time of this teacher's pass over the sample and its scoring.
    """

    name: str
    score: float
    method: str
    rank: int
    cost_matrix: torch.Tensor
    seconds: float


def _same_labels(reference: torch.Tensor | None, labels: torch.Tensor, name: str) -> torch.Tensor:
    if reference is not None and not torch.equal(reference, labels):
        raise ValueError(f"images: the data yielded different labels for teacher {name!r} than for the first "
                         "teacher; iterate it in a fixed order (e.g. ProxyImages(shuffle=False))")
    return labels


def rank_teachers(teachers: Mapping[str, nn.Module], images, labels=None, *, method: str = "ot",
                  num_classes: int | None = None, temperature: float = 1.0, eps: float = 0.05,
                  metric: str = "cosine", label_smoothing: float = 0.0, batch_size: int = 256, device=None,
                  seed: int = 0) -> list[TeacherScore]:
    """Score every teacher for the labeled target sample; return the records, best first.

    Args:
        teachers: ``{name: classifier}``; each classifier's last module must be
            an ``nn.Linear`` (its input is the teacher's feature space).
        images, labels: the labeled target sample: tensors ``[N, ...]`` and
            ``[N]``, or an iterable of ``(images, labels)`` batches (a labeled
            ``ProxyImages``, iterated once per teacher in the same order) with
            ``labels=None``.
        method: ``"ot"`` (default; :func:`rcfast.select.scores.ot_score`),
            ``"leep"`` or ``"linear_probe"``.
        num_classes: target classes (default: from the labels, or the data's
            ``num_classes``); each needs at least one sample.
        temperature, eps, label_smoothing: of the ``ot`` score.
        metric: the cost matrix's distance, ``"cosine"`` or ``"euclidean"``.
        batch_size: rows per forward pass for tensor inputs.
        device: where teachers run (default: each teacher's own device).
        seed: of the linear probe's split.

    Returns:
        :class:`TeacherScore` records sorted best first (``rank`` 1 first);
        ties keep the mapping's order.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if method == "linear_probe":
        require("rank_teachers(method='linear_probe')", *LINEAR_PROBE_MODULES)
    if not isinstance(teachers, Mapping) or not teachers:
        raise ValueError("teachers must be a non-empty mapping {name: classifier}")
    for name, teacher in teachers.items():
        final_linear(teacher, f"teacher {name!r}")  # every teacher checked before any runs
    if isinstance(images, torch.Tensor):
        num_classes = check_labels(labels, num_classes)
    elif num_classes is None:
        num_classes = getattr(images, "num_classes", None)

    records, reference_labels = [], None
    for name, teacher in teachers.items():
        start = time.perf_counter()
        out = classifier_outputs(teacher, images, labels, batch_size=batch_size, device=device,
                                 name=f"teacher {name!r}")
        reference_labels = _same_labels(reference_labels, out.labels, name)
        cost = prototype_cost(out.features, out.labels, out.weight, num_classes, metric)
        if method == "ot":
            score = ot_score(out.logits, out.labels, cost, temperature=temperature, eps=eps,
                             label_smoothing=label_smoothing)
        elif method == "leep":
            score = leep_score(out.logits, out.labels, cost.shape[1])
        else:
            score = linear_probe_score(out.features, out.labels, seed=seed)
        records.append(TeacherScore(name=name, score=score, method=method, rank=0, cost_matrix=cost,
                                    seconds=time.perf_counter() - start))
    sign = -1.0 if METHODS[method] else 1.0
    records.sort(key=lambda record: sign * record.score)  # stable: ties keep the mapping's order
    for rank, record in enumerate(records, start=1):
        record.rank = rank
    return records
