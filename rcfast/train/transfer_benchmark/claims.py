"""Statistics over seeds, and the paper's three claims tested as statements.

**Score.** A model's *transfer score* on a downstream task is its linear-probe
accuracy averaged over the shot counts (e.g. 5- and 20-shot). kNN accuracies
are reported next to it but do not decide a claim.

**Comparisons are paired by seed.** Each seed is a full replicate (its own
class split, renderings, generalist, specialists, students and probes), and
all models of a seed are probed on the same tasks, so a claim compares models
through their per-seed differences d_1..d_n:

- *A beats B*: ``mean(d) > 0`` and ``mean(d) > std(d)`` (sample std over
  seeds), i.e. a paired t-statistic above sqrt(n) (1.73 for 3 seeds, about a
  one-sided 10 % level; 2.24 for 5 seeds, about 5 %);
- *A is close to B* (within a margin m): ``mean(d) + std(d) <= m`` with
  d = B - A, i.e. A trails B by at most m even one std on the pessimistic side.

The one-sided p-value of the paired t-test (``scipy.stats.ttest_1samp``) is
reported with each comparison for reference. One seed decides nothing (no
spread): a claim is then marked as not holding and ``decidable: false``.

**The claims** (S_1 the first specialist script; (a) single-head KD of S_1,
(b) RepCon, (d) the oracle):

1. Distilling a task teacher reduces transferability: the mean score over all
   downstream tasks of (a) is below the generalist's *and* below its teacher's.
2. RepCon beats the teachers and the generalist on future tasks of the
   experts' domains: on the held-out classes of each specialist script, (b)
   scores above the generalist, and above the best specialist teacher on that
   task (both averaged over the specialist scripts).
3. RepCon is close to the jointly trained oracle: the oracle's mean score over
   all downstream tasks exceeds (b)'s by at most ``oracle_margin``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

__all__ = ["Comparison", "transfer_score", "aggregate", "evaluate_claims", "learning_check", "mean_std"]

MEAN_TASK = "mean"


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    values = [float(v) for v in values]
    mean = float(np.mean(values))
    return mean, (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def transfer_score(task_result: dict, shots: Sequence[int]) -> float:
    """Linear-probe accuracy averaged over the shot counts."""
    return float(np.mean([task_result[f"probe@{n}"] for n in shots]))


def _scores(seed_result: dict, model: str, tasks: Sequence[str], shots) -> float:
    return float(np.mean([transfer_score(seed_result["transfer"][model][t], shots) for t in tasks]))


def aggregate(seed_results: Sequence[dict], shots: Sequence[int]) -> dict:
    """``{model: {task: {metric: {"mean", "std", "values"}}}}`` over seeds.

    Metrics: every ``probe@n`` and ``knn@n``, plus ``score`` (the transfer
    score) and ``knn_mean`` (kNN averaged over the shot counts); the task
    ``"mean"`` holds each metric averaged over the tasks.
    """
    first = seed_results[0]["transfer"]
    tasks = list(next(iter(first.values())))
    out: dict = {}
    for model in first:
        out[model] = {}
        for task in [*tasks, MEAN_TASK]:
            per_seed = []
            for result in seed_results:
                by_task = result["transfer"][model]
                chosen = tasks if task == MEAN_TASK else [task]
                metrics = {m: float(np.mean([by_task[t][m] for t in chosen])) for m in by_task[tasks[0]]}
                metrics["score"] = float(np.mean([transfer_score(by_task[t], shots) for t in chosen]))
                metrics["knn_mean"] = float(np.mean([by_task[t][f"knn@{n}"] for t in chosen for n in shots]))
                per_seed.append(metrics)
            out[model][task] = {}
            for metric in per_seed[0]:
                values = [m[metric] for m in per_seed]
                mean, std = mean_std(values)
                out[model][task][metric] = {"mean": mean, "std": std, "values": values}
    return out


@dataclass
class Comparison:
    """Paired per-seed differences and the verdict of one rule on them."""

    name: str
    rule: str              # "greater": mean > 0 and mean > std; "within": mean + std <= margin
    differences: list[float]
    mean: float
    std: float | None
    p_value: float | None  # one-sided paired t-test of the rule's direction (for reference)
    passes: bool
    margin: float | None = None

    @classmethod
    def greater(cls, name: str, differences: Sequence[float]) -> "Comparison":
        mean, std = mean_std(differences)
        passes = std is not None and mean > 0 and mean > std
        return cls(name, "greater", list(map(float, differences)), mean, std,
                   _p_value(differences, "greater"), passes)

    @classmethod
    def within(cls, name: str, differences: Sequence[float], margin: float) -> "Comparison":
        mean, std = mean_std(differences)
        passes = std is not None and mean + std <= margin
        return cls(name, "within", list(map(float, differences)), mean, std,
                   _p_value([d - margin for d in differences], "less"), passes, margin)

    def describe(self) -> str:
        std = f"{self.std:.3f}" if self.std is not None else "n/a"
        rule = ("mean > 0 and mean > std" if self.rule == "greater"
                else f"mean + std <= {self.margin:.3f}")
        verdict = "passes" if self.passes else "fails"
        p = f", one-sided paired t-test p = {self.p_value:.3f}" if self.p_value is not None else ""
        return f"{self.name}: {self.mean:+.3f} +- {std} over seeds ({rule}: {verdict}{p})"


def _p_value(differences: Sequence[float], alternative: str) -> float | None:
    if len(differences) < 2 or float(np.std(differences)) == 0.0:
        return None
    from scipy.stats import ttest_1samp

    p = float(ttest_1samp(np.asarray(differences, dtype=np.float64), 0.0, alternative=alternative).pvalue)
    return p if math.isfinite(p) else None


def evaluate_claims(seed_results: Sequence[dict], *, downstream: Sequence[str], specialist_tasks: Sequence[str],
                    specialist_futures: Sequence[str], specialist_scripts: Sequence[str], shots: Sequence[int],
                    oracle_margin: float, student_init: str = "generalist") -> list[dict]:
    """The three claims as dicts: statement, how it is tested, comparisons, ``holds``.

    ``specialist_tasks[k]`` is the teacher run suffix (``georgian``) of
    ``specialist_scripts[k]`` and ``specialist_futures[k]`` its downstream task.
    """
    n = len(seed_results)
    shots_text = "/".join(map(str, shots))
    score_text = f"linear-probe accuracy averaged over {shots_text}-shot"
    first, teacher_first = specialist_scripts[0], f"teacher_{specialist_tasks[0]}"
    init = ("initialised from the generalist" if student_init == "generalist" else "initialised at random")

    def diffs(a: str, b: str, tasks: Sequence[str]) -> list[float]:
        return [_scores(r, a, tasks, shots) - _scores(r, b, tasks, shots) for r in seed_results]

    def best_teacher_gap(r: dict) -> float:
        gaps = []
        for future in specialist_futures:
            best = max(_scores(r, f"teacher_{t}", [future], shots) for t in specialist_tasks)
            gaps.append(_scores(r, "repcon", [future], shots) - best)
        return float(np.mean(gaps))

    claim_1 = [Comparison.greater("generalist - (a)", diffs("teacher_general", "single_kd", downstream)),
               Comparison.greater(f"{first} teacher - (a)", diffs(teacher_first, "single_kd", downstream))]
    claim_2 = [Comparison.greater("(b) - generalist", diffs("repcon", "teacher_general", specialist_futures)),
               Comparison.greater("(b) - best specialist teacher", [best_teacher_gap(r) for r in seed_results])]
    claim_3 = [Comparison.within("(d) oracle - (b)", diffs("oracle", "repcon", downstream), oracle_margin)]
    claims = [
        (f"Distilling a task teacher reduces transferability: the single-head KD student (a) of the {first} "
         f"specialist ({init}) transfers worse than the generalist and worse than its own teacher.",
         f"mean over all {len(downstream)} downstream tasks of the {score_text}", claim_1),
        ("A multi-head student with a generalist head (b, RepCon) beats the teachers and the generalist on "
         "future tasks of the experts' domains (held-out classes of the specialist scripts).",
         f"{score_text} on each specialist script's held-out classes, averaged over the "
         f"{len(specialist_futures)} scripts; the best teacher is chosen per task", claim_2),
        (f"RepCon (b) is close to the jointly trained multi-task oracle (d): within {oracle_margin:.3f} "
         f"({100 * oracle_margin:.0f} points of accuracy) or better.",
         f"mean over all {len(downstream)} downstream tasks of the {score_text}", claim_3),
    ]
    out = []
    for i, (statement, metric, comparisons) in enumerate(claims, start=1):
        out.append({
            "id": i, "statement": statement, "holds": bool(n >= 2 and all(c.passes for c in comparisons)),
            "decidable": n >= 2, "metric": metric,
            "test": "; ".join(c.describe() for c in comparisons),
            "comparisons": [asdict(c) for c in comparisons],
        })
    return out


def learning_check(seed_results: Sequence[dict], *, downstream: Sequence[str], shots: Sequence[int]) -> dict:
    """Not a claim of the paper: does training help at all? The generalist against a random backbone.

    Where a random backbone probes as well as the trained ones, the teachers
    are too weak for the claims to mean much; the report says so.
    """
    differences = [_scores(r, "teacher_general", downstream, shots) - _scores(r, "random_init", downstream, shots)
                   for r in seed_results]
    comparison = Comparison.greater("generalist - random init", differences)
    return {"statement": "The trained generalist's features transfer better than a random backbone's "
                         "(mean over all downstream tasks).",
            "holds": comparison.passes, "decidable": len(seed_results) >= 2, "test": comparison.describe(),
            "comparisons": [asdict(comparison)]}
