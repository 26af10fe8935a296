"""``rcfast demo --method dmc``: class-incremental learning by deep model consolidation (arXiv 1903.07864).

On ten classes of the embedded digits or of the glyphs (``data``; see
:mod:`rcfast.train.method_demos`), at 16x16 pixels by default, classes A = 0-4
("old") and B = 5-9 ("new"), per seed:

1. the old model is trained with labels on A's images of ``teacher_train``, the
   new model on B's (each a ``small_cnn`` with five outputs);
2. the DMC student (the same architecture, ten outputs, from scratch) is trained
   on the unlabeled auxiliary images only (``auxiliary``: images no model saw)
   with the objective ``double_distill`` of the two models;
3. baselines: fine-tuning the old model on B's labels alone (its five old
   output rows kept, five new ones added: the forgetting baseline), and joint
   training with all labels of A u B (the oracle).

Every model is scored on the test images: on A u B (the old and new models
can only name their own classes), and on A and B separately. Mean ± std over
the seeds.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rcfast.eval.report import markdown_table
from rcfast.train.method_demos import (BACKBONE, RunSettings, accuracy, format_mean_std, load_classifier, predict,
                                       run_config, run_dict, start_demo, teacher_entry, write_list)

__all__ = ["DMCDemoSettings", "run_dmc_demo"]

OLD, NEW = tuple(range(5)), tuple(range(5, 10))
LABELS = {
    "old": "old model (A: classes 0-4)",
    "new": "new model (B: classes 5-9)",
    "finetune": "fine-tune old on B (labels of B)",
    "dmc": "DMC student (unlabeled auxiliary data)",
    "joint": "joint training on A u B (oracle)",
}
COLUMNS = {"all": "A u B", "old": "A", "new": "B"}


@dataclass
class DMCDemoSettings:
    """Budgets; ``quick()`` is a smoke-test size."""

    seeds: int = 3
    data: str = "digits"
    width: int = 8
    model_steps: int = 300
    finetune_steps: int = 150
    dmc_steps: int = 600
    run: RunSettings = field(default_factory=lambda: RunSettings(batch_size=64))

    @classmethod
    def quick(cls) -> "DMCDemoSettings":
        return cls(seeds=2, model_steps=4, finetune_steps=3, dmc_steps=4, run=RunSettings(batch_size=16))


def _keep_old_rows(old_final: Path):
    """``prepare`` for the fine-tuning run: start from the whole old model, its five rows first."""
    def prepare(trainer) -> None:
        state = torch.load(old_final, map_location="cpu", weights_only=True)["model"]
        student = trainer.student
        with torch.no_grad():
            student.backbone.load_state_dict({k[len("backbone."):]: v for k, v in state.items()
                                              if k.startswith("backbone.")})
            student.heads.weight[:len(OLD)].copy_(state["heads.weight"])
            student.heads.bias[:len(OLD)].copy_(state["heads.bias"])
    return prepare


def run_dmc_demo(out_dir: str | Path = "rcfast-demo-dmc", quick: bool = False,
                 settings: DMCDemoSettings | None = None, log=print, data_root: str | Path | None = None) -> dict:
    """Run the class-incremental scenario into ``out_dir``; return the results (also ``results.json``, ``report.md``).

    ``data_root``: where the data set is written once (default ``<out_dir>/data``).
    """
    s = settings or (DMCDemoSettings.quick() if quick else DMCDemoSettings())
    dirs, task, test = start_demo(out_dir, s.data, s.run, data_root)
    runs, configs, lists = dirs.runs, dirs.configs, dirs.lists
    sources = {
        "old": write_list(lists / "old_A.txt", task.teacher_train, OLD, relabel=True),
        "new": write_list(lists / "new_B.txt", task.teacher_train, NEW, relabel=True),
        "finetune": write_list(lists / "B_global_labels.txt", task.teacher_train, NEW),
        "joint": write_list(lists / "A_and_B.txt", task.teacher_train),
        "dmc": task.auxiliary_folder,  # read without labels
    }
    ce = [{"term": "cross_entropy"}]
    results: dict[str, dict[str, list[float]]] = {name: {c: [] for c in COLUMNS} for name in LABELS}
    for seed in range(s.seeds):
        def train(name: str, heads: dict, objective: list, steps: int, teachers=(), labels=True, prepare=None):
            run_name = f"{name}_seed{seed}"
            config = run_dict(s.run, out_dir=runs / run_name, seed=seed, steps=steps, source=sources[name],
                              heads=heads, width=s.width, objective=objective, teachers=teachers, labels=labels)
            run_config(config, configs, run_name, log, prepare=prepare)
            return runs / run_name / "final.pt"

        finals = {
            "old": train("old", {"old": len(OLD)}, ce, s.model_steps),
            "new": train("new", {"new": len(NEW)}, ce, s.model_steps),
            "joint": train("joint", {"all": 10}, ce, s.model_steps),
        }
        finals["finetune"] = train("finetune", {"all": 10}, ce, s.finetune_steps,
                                   prepare=_keep_old_rows(finals["old"]))
        teachers = [teacher_entry("old", finals["old"], len(OLD), s.width),
                    teacher_entry("new", finals["new"], len(NEW), s.width)]
        finals["dmc"] = train("dmc", {"all": 10}, [{"term": "double_distill"}], s.dmc_steps, teachers=teachers,
                              labels=False)
        for name, final in finals.items():
            outputs = {"old": OLD, "new": NEW}.get(name, tuple(range(10)))
            predictions, labels = predict(load_classifier(final, BACKBONE, len(outputs), {"width": s.width}), test)
            for column, among in (("all", None), ("old", OLD), ("new", NEW)):
                results[name][column].append(accuracy(predictions, labels, classes=outputs, among=among))
    summary = {"accuracy": results, "settings": asdict(s), "data": task.description, "classes": task.names,
               "sizes": {"auxiliary": len(task.auxiliary), "test": len(task.test)},
               "total_seconds": dirs.elapsed()}
    (dirs.out / "results.json").write_text(json.dumps(summary, indent=1))
    summary["table"] = markdown_table(
        {LABELS[name]: {COLUMNS[c]: format_mean_std(v) for c, v in per.items()} for name, per in results.items()},
        list(COLUMNS.values()), row_header="model (test accuracy %, mean ± std)")
    (dirs.out / "report.md").write_text(_report(summary, s))
    return summary


def _report(summary: dict, s: DMCDemoSettings) -> str:
    names = summary["classes"]
    return f"""# DMC: class-incremental consolidation of an old and a new model

Data: {summary['data']}; A = {' '.join(names[:5])} (the old model's classes), B = {' '.join(names[5:])} (the new
model's). All models `{BACKBONE}` width {s.width}, {s.run.image_size}x{s.run.image_size} pixels, batch
{s.run.batch_size}; old, new and joint models {s.model_steps} steps with labels; fine-tuning {s.finetune_steps} steps on
B's labels; the DMC student {s.dmc_steps} steps on {summary['sizes']['auxiliary']} unlabeled auxiliary images
(objective `double_distill`); {s.seeds} seeds (mean ± sample std). Test: {summary['sizes']['test']} images no model
trained on; columns: all of them, those of A, those of B.

{summary['table']}

The whole run took {summary['total_seconds']:.0f} s. Every run's config is in `configs/` (the fine-tuning run
also starts from the old model's weights, copied in by the demo: a config's `init_from` loads a backbone only).
"""
