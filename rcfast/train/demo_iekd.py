"""``rcfast demo --method iekd``: does inheritance and exploration beat plain KD? (arXiv 2107.00181)

On ten classes of the embedded digits or of the glyphs (``data``; see
:mod:`rcfast.train.method_demos`), at 16x16 pixels by default:

1. a teacher (``small_cnn``, width 16) is trained with labels on the whole
   training pool, and its last feature map's auto-encoder is pretrained
   (objective ``factor_reconstruction``);
2. students (``small_cnn``, width 8) get only ``labels_per_class`` labeled
   images per class (the first ones of the pool) and, per seed, are trained as
   (i) cross-entropy from scratch; (ii) + KD from the teacher (``multihead_kd``);
   (iii) + KD + IE-KD (``iekd_inherit`` + ``iekd_explore``) with each exploration
   loss; (iv) deep mutual learning of two such students (``mutual_learning``),
   without and with IE-KD between them;
3. every student is scored on the test images; the table gives mean ± std
   over the seeds, and the paper's claim "(iii) beats (ii)" is checked per
   exploration loss on the paired (same seed) differences.

The teacher and its auto-encoder are trained once (seed 0); the students' seed
sets their initial weights and the order of their batches.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rcfast.eval.report import markdown_table
from rcfast.train.method_demos import (BACKBONE, FEATURE_LAYER, RunSettings, accuracy, format_mean_std,
                                       load_classifier, mean_std, predict, run_config, run_dict, start_demo,
                                       teacher_entry, write_list)

__all__ = ["IEKDDemoSettings", "run_iekd_demo"]

EXPLORATIONS = ("l1", "cos", "cka")
HEAD = "task"
LABELS = {
    "scratch": "(i) scratch, labels only",
    "kd": "(ii) + KD",
    **{f"iekd_{kind}": f"(iii) + KD + IE-KD ({kind})" for kind in EXPLORATIONS},
    "dml": "(iv) mutual learning",
    "ie_dml": "(iv) mutual learning + IE-KD (l1)",
}


@dataclass
class IEKDDemoSettings:
    """Budgets and hyper-parameters; ``quick()`` is a smoke-test size."""

    seeds: int = 3
    data: str = "digits"
    labels_per_class: int = 10
    teacher_width: int = 16
    student_width: int = 8
    factor_channels: int = 16
    teacher_steps: int = 400
    autoencoder_steps: int = 200
    student_steps: int = 300
    temperature: float = 4.0
    kd_weight: float = 1.0
    inherit_weight: float = 1.0
    explore_weight: float = 1.0
    run: RunSettings = field(default_factory=RunSettings)

    @classmethod
    def quick(cls) -> "IEKDDemoSettings":
        return cls(seeds=2, teacher_steps=6, autoencoder_steps=4, student_steps=4, labels_per_class=4,
                   run=RunSettings(batch_size=16))


def _first_per_class(items, per_class: int):
    chosen, counts = [], {}
    for path, label in items:
        if counts.get(label, 0) < per_class:
            chosen.append((path, label))
            counts[label] = counts.get(label, 0) + 1
    return chosen


def _student_objectives(s: IEKDDemoSettings, autoencoder: Path) -> dict[str, tuple[list, bool]]:
    """``{run: (objective, uses the teacher)}`` of the students."""
    kd = [{"term": "cross_entropy"},
          {"term": "multihead_kd", "heads": {HEAD: "teacher"}, "temperature": s.temperature,
           "weight": s.kd_weight}]
    runs = {"scratch": ([{"term": "cross_entropy"}], False), "kd": (kd, True)}
    for kind in EXPLORATIONS:
        common = {"autoencoder": str(autoencoder), "student_layer": FEATURE_LAYER}
        runs[f"iekd_{kind}"] = (kd + [{"term": "iekd_inherit", "weight": s.inherit_weight, **common},
                                      {"term": "iekd_explore", "weight": s.explore_weight, "exploration": kind,
                                       **common}], True)
    peer = {"term": "mutual_learning", "peer_backbone": BACKBONE,
            "peer_backbone_kwargs": {"width": s.student_width}}
    runs["dml"] = ([{"term": "cross_entropy"}, peer], False)
    iekd = {"student_layer": FEATURE_LAYER, "peer_layer": FEATURE_LAYER, "factor_channels": s.factor_channels,
            "exploration": "l1", "inherit_weight": s.inherit_weight, "explore_weight": s.explore_weight}
    runs["ie_dml"] = ([{"term": "cross_entropy"}, dict(peer, iekd=iekd)], False)
    return runs


def run_iekd_demo(out_dir: str | Path = "rcfast-demo-iekd", quick: bool = False,
                  settings: IEKDDemoSettings | None = None, log=print, data_root: str | Path | None = None) -> dict:
    """Run the IE-KD comparison into ``out_dir``; return the results (also ``results.json``, ``report.md``).

    ``data_root``: where the data set is written once (default ``<out_dir>/data``).
    """
    s = settings or (IEKDDemoSettings.quick() if quick else IEKDDemoSettings())
    dirs, task, test = start_demo(out_dir, s.data, s.run, data_root)
    runs, configs, lists = dirs.runs, dirs.configs, dirs.lists
    pool = write_list(lists / "pool.txt", task.pool)
    labeled = write_list(lists / "student_labeled.txt", _first_per_class(task.pool, s.labels_per_class))

    head = {HEAD: 10}
    run_config(run_dict(s.run, out_dir=runs / "teacher", seed=0, steps=s.teacher_steps, source=pool,
                        heads=head, width=s.teacher_width, objective=[{"term": "cross_entropy"}]),
               configs, "teacher", log)
    teacher = teacher_entry("teacher", runs / "teacher" / "final.pt", 10, s.teacher_width)
    run_config(run_dict(s.run, out_dir=runs / "teacher_autoencoder", seed=0, steps=s.autoencoder_steps,
                        source=pool, labels=False, heads=head, width=s.student_width, teachers=[teacher],
                        objective=[{"term": "factor_reconstruction", "layer": FEATURE_LAYER,
                                    "factor_channels": s.factor_channels}]),
               configs, "teacher_autoencoder", log)
    teacher_model = load_classifier(runs / "teacher" / "final.pt", BACKBONE, 10, {"width": s.teacher_width})
    results = {"teacher": accuracy(*predict(teacher_model, test)), "students": {}}

    for seed in range(s.seeds):
        for name, (objective, uses_teacher) in _student_objectives(s, runs / "teacher_autoencoder").items():
            run_name = f"{name}_seed{seed}"
            run_config(run_dict(s.run, out_dir=runs / run_name, seed=seed, steps=s.student_steps, source=labeled,
                                heads=head, width=s.student_width, objective=objective,
                                teachers=[teacher] if uses_teacher else []),
                       configs, run_name, log)
            student = load_classifier(runs / run_name / "final.pt", BACKBONE, 10, {"width": s.student_width})
            results["students"].setdefault(name, []).append(accuracy(*predict(student, test)))
    results.update(claims=_claims(results["students"]), settings=asdict(s), data=task.description,
                   sizes={"pool": len(task.pool), "test": len(task.test)},
                   total_seconds=dirs.elapsed())
    (dirs.out / "results.json").write_text(json.dumps(results, indent=1))
    results["table"] = _table(results)
    (dirs.out / "report.md").write_text(_report(results, s))
    return results


def _claims(students: dict[str, list[float]]) -> dict[str, dict]:
    """Per exploration loss: (iii) - (ii) on the same seeds, and whether it is above zero on every seed."""
    out = {}
    for kind in EXPLORATIONS:
        diffs = [a - b for a, b in zip(students[f"iekd_{kind}"], students["kd"])]
        mean, std = mean_std(diffs)
        out[kind] = {"difference": diffs, "mean": mean, "std": std, "wins": sum(d > 0 for d in diffs),
                     "seeds": len(diffs)}
    return out


def _table(results: dict) -> str:
    rows = {"teacher (width 16, all labels)": {"test accuracy (%)": f"{100 * results['teacher']:.1f}"}}
    for name, values in results["students"].items():
        rows[LABELS[name]] = {"test accuracy (%)": format_mean_std(values),
                              "per seed": " / ".join(f"{100 * v:.1f}" for v in values)}
    return markdown_table(rows, ["test accuracy (%)", "per seed"])


def _report(results: dict, s: IEKDDemoSettings) -> str:
    claims = "\n".join(
        f"- {kind}: (iii) - (ii) = {100 * c['mean']:+.1f} ± {100 * c['std']:.1f} points; (iii) higher on "
        f"{c['wins']} of {c['seeds']} seeds" for kind, c in results["claims"].items())
    return f"""# IE-KD: does inheritance and exploration beat plain KD?

Data: {results['data']}. Students: `{BACKBONE}` width {s.student_width}, {s.labels_per_class} labeled images per
class, {s.student_steps} steps, batch {s.run.batch_size}, {s.run.image_size}x{s.run.image_size} pixels; teacher
width {s.teacher_width} trained on all {results['sizes']['pool']} training images ({s.teacher_steps} steps); KD
temperature {s.temperature}; IE-KD weights {s.inherit_weight} / {s.explore_weight}, factor channels
{s.factor_channels}; {s.seeds} seeds (mean ± sample std). Test: {results['sizes']['test']} images no model trained on.

{results['table']}

The claim "(iii) beats (ii)", on paired seeds:
{claims}

The whole run took {results['total_seconds']:.0f} s. Every run's config is in `configs/`.
"""
