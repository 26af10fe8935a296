"""``rcfast demo``: representation consolidation end to end on the embedded digits.

1. ``rcfast.data.demo_dataset`` writes the digits splits (teacher data, an
   unlabeled proxy split, held-out downstream tasks).
2. Three teachers are trained (objective ``cross_entropy`` on their labeled
   task): a generalist on all ten digits and two task-specific ones (digits
   0-4, digits 5-9).
3. Four students are trained with the same backbone and step budget:
   (a) single-head KD from task teacher A, (b) RepCon (both task teachers + the
   generalist), (c) multi-teacher KD without the generalist, all on the
   unlabeled proxy images (objective ``multihead_kd``), and (d) the multi-task
   oracle trained with labels on the teachers' own data (one ``cross_entropy``
   term per head on its own task, the batch split over the tasks so it sees as
   many images per step as the students).
4. Every backbone (the students', the oracle's, the teachers', and a randomly
   initialised one) is frozen and scored on each downstream task by a linear
   probe and kNN.

Every run goes through a YAML config in ``<out>/configs`` and
``Consolidator.from_config`` -- the same path as ``rcfast consolidate`` -- and
all images flow through ``rcfast.data.ProxyImages``. Seeds are fixed; the
numbers are whatever the runs produce.
"""
from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rcfast.eval import classifier_accuracy, evaluate_transfer
from rcfast.eval.report import bar_chart, format_table, markdown_table
from rcfast.models import build_classifier, build_model, classifier_backbone
from rcfast.train.config import (DataConfig, OptimConfig, RunConfig, StudentConfig, TaskConfig, TeacherConfig,
                                 TrainConfig, dump_config, load_config)
from rcfast.train.checkpoint import isolated_rng, load_checkpoint, seed_everything
from rcfast.train.consolidator import Consolidator
from rcfast.train.teachers import extract_model_state

__all__ = ["DemoSettings", "run_demo"]

BACKBONE = "small_cnn"


@dataclass
class DemoSettings:
    """Budgets of the demo; ``quick()`` is a smoke-test size."""

    teacher_steps: int = 150
    student_steps: int = 200
    batch_size: int = 64
    width: int = 16
    lr: float = 2e-3
    temperature: float = 4.0
    seed: int = 0
    image_size: int = 32
    data_backend: str = "auto"
    num_threads: int = 1
    knn_k: int = 10
    precision: str = "fp32"

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(teacher_steps=4, student_steps=4, batch_size=32)


def _data(settings: DemoSettings, source: str = "") -> DataConfig:
    # Digits are small and centred: no crops or flips (a flipped 2 is not a 2);
    # batches are reshuffled every epoch.
    return DataConfig(source=source, image_size=settings.image_size, batch_size=settings.batch_size,
                      augment="none", shuffle=True, backend=settings.data_backend,
                      num_threads=settings.num_threads, drop_last=True)


def _train(settings: DemoSettings, out: Path, steps: int) -> TrainConfig:
    return TrainConfig(max_steps=steps, precision=settings.precision, seed=settings.seed,
                       log_every=max(1, steps // 10), checkpoint_every=0, keep_checkpoints=1,
                       out_dir=str(out), resume="none", progress=True)


def _optim(settings: DemoSettings, steps: int) -> OptimConfig:
    return OptimConfig(name="adamw", lr=settings.lr, weight_decay=0.05, warmup_steps=max(1, steps // 10),
                       clip_grad_norm=1.0)


def _student(settings: DemoSettings) -> StudentConfig:
    return StudentConfig(backbone=BACKBONE, backbone_kwargs={"width": settings.width})


def demo_configs(manifest: dict, out: Path, settings: DemoSettings) -> dict[str, RunConfig]:
    """The demo's runs, teachers first: ``{run_name: RunConfig}``."""
    runs = out / "runs"
    teacher_tasks = {
        "generalist": TaskConfig("generalist", manifest["teacher_all"]["train"], 10),
        "task_a": TaskConfig("task_a", manifest["task_a"]["train"], 5),
        "task_b": TaskConfig("task_b", manifest["task_b"]["train"], 5),
    }
    configs: dict[str, RunConfig] = {}
    for name, task in teacher_tasks.items():
        configs[f"teacher_{name}"] = RunConfig(
            student=_student(settings), tasks=[task], data=_data(settings),
            objective=[{"term": "cross_entropy", "head": name}],
            optim=_optim(settings, settings.teacher_steps),
            train=_train(settings, runs / f"teacher_{name}", settings.teacher_steps))

    def teacher(name: str) -> TeacherConfig:
        return TeacherConfig(name=name, builder=BACKBONE, num_classes=teacher_tasks[name].num_classes,
                             checkpoint=str(runs / f"teacher_{name}" / "final.pt"),
                             builder_kwargs={"width": settings.width}, generalist=name == "generalist")

    students = {
        "single_kd_a": ["task_a"],
        "repcon": ["task_a", "task_b", "generalist"],
        "multi_kd_no_generalist": ["task_a", "task_b"],
    }
    for name, teacher_names in students.items():
        configs[name] = RunConfig(
            student=_student(settings), teachers=[teacher(t) for t in teacher_names],
            data=_data(settings, manifest["proxy"]["path"]),
            objective=[{"term": "multihead_kd", "temperature": settings.temperature}],
            optim=_optim(settings, settings.student_steps),
            train=_train(settings, runs / name, settings.student_steps))
    oracle_tasks = [teacher_tasks[t] for t in ("task_a", "task_b", "generalist")]
    # Each task stream yields one batch per step; splitting the batch size over
    # the tasks gives the oracle as many images per step as the students.
    oracle_data = _data(settings)
    oracle_data.batch_size = max(1, settings.batch_size // len(oracle_tasks))
    configs["oracle_multitask"] = RunConfig(
        student=_student(settings), tasks=oracle_tasks,
        objective=[{"term": "cross_entropy", "head": task.name} for task in oracle_tasks],
        data=oracle_data, optim=_optim(settings, settings.student_steps),
        train=_train(settings, runs / "oracle_multitask", settings.student_steps))
    return configs


def _labeled(folder: str, settings: DemoSettings):
    from rcfast.data import ProxyImages
    return ProxyImages(folder, image_size=settings.image_size, batch_size=256, device="cpu", augment="none",
                       labels=True, drop_last=False, shuffle=False, backend=settings.data_backend,
                       num_threads=settings.num_threads)


LABELS = {
    "random_init": "random init",
    "teacher_generalist": "teacher: generalist (0-9)",
    "teacher_task_a": "teacher: task A (0-4)",
    "teacher_task_b": "teacher: task B (5-9)",
    "single_kd_a": "(a) single-head KD (A)",
    "repcon": "(b) RepCon (A+B+generalist)",
    "multi_kd_no_generalist": "(c) multi-head KD (A+B)",
    "oracle_multitask": "(d) oracle multi-task (labels)",
}


def run_demo(out_dir: str | Path = "rcfast-demo", quick: bool = False, settings: DemoSettings | None = None,
             log=print) -> dict:
    """Run the whole demo into ``out_dir``; return the results (also in ``results.json``).

    Writes ``configs/*.yaml``, ``runs/<run>/`` (metrics, checkpoints),
    ``report.md``, ``transfer.png`` and ``results.json``.
    """
    from rcfast.data import demo_dataset

    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    manifest = demo_dataset(out / "data")
    configs = demo_configs(manifest, out, settings)
    (out / "configs").mkdir(exist_ok=True)

    summaries, final_paths = {}, {}
    for name, config in configs.items():
        run_dir = Path(config.train.out_dir)
        if run_dir.exists():
            shutil.rmtree(run_dir)  # the demo owns runs/<name>: a rerun starts from scratch
        config_path = out / "configs" / f"{name}.yaml"
        dump_config(config, config_path)
        log(f"[demo] {name}: rcfast consolidate --config {config_path}")
        trainer = Consolidator.from_config(load_config(config_path))
        summaries[name] = trainer.fit()
        trainer.close()
        final_paths[name] = Path(summaries[name]["final"])
        log(f"[demo] {name}: {summaries[name]['steps']} steps, loss {summaries[name]['loss']:.4f}, "
            f"{summaries[name]['images_per_sec']:.0f} images/s")
    train_seconds = time.perf_counter() - started

    # Backbones to evaluate: a fresh random one, the teachers', the students'.
    with isolated_rng():  # a seeded random backbone, without reseeding the caller's RNG
        seed_everything(settings.seed)
        backbones = {"random_init": build_model(BACKBONE, width=settings.width)}
    teacher_accuracy = {}
    for name in ("teacher_generalist", "teacher_task_a", "teacher_task_b"):
        task = configs[name].tasks[0]
        model = build_classifier(BACKBONE, task.num_classes, width=settings.width)
        model.load_state_dict(extract_model_state(load_checkpoint(final_paths[name])))
        test_folder = manifest[{"teacher_generalist": "teacher_all", "teacher_task_a": "task_a",
                                "teacher_task_b": "task_b"}[name]]["test"]
        teacher_accuracy[name] = classifier_accuracy(model, _labeled(test_folder, settings))
        backbones[name] = classifier_backbone(model)
    for name in ("single_kd_a", "repcon", "multi_kd_no_generalist", "oracle_multitask"):
        model = build_model(BACKBONE, width=settings.width)
        state = extract_model_state(load_checkpoint(final_paths[name]))
        model.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
        backbones[name] = model

    tasks = manifest["downstream"]
    # One pipeline per split, re-iterated for every backbone (building one costs more than an epoch).
    task_data = {name: (_labeled(task["train"], settings), _labeled(task["test"], settings))
                 for name, task in tasks.items()}
    transfer: dict[str, dict[str, dict]] = {}
    for model_name, backbone in backbones.items():
        transfer[model_name] = {}
        for task_name, (train_data, test_data) in task_data.items():
            transfer[model_name][task_name] = evaluate_transfer(
                backbone, train_data, test_data, knn_k=settings.knn_k, seed=settings.seed)
        log(f"[demo] evaluated {model_name}: " + ", ".join(
            f"{t} {r['linear_probe']:.3f}" for t, r in transfer[model_name].items()))
    total_seconds = time.perf_counter() - started

    results = {"settings": settings.__dict__, "manifest_root": manifest["root"], "transfer": transfer,
               "teacher_test_accuracy": teacher_accuracy,
               "training": {k: {"steps": v["steps"], "images_per_sec": v["images_per_sec"],
                                "wall_time_s": v["wall_time_s"], "final_loss": v["loss"]}
                            for k, v in summaries.items()},
               "train_seconds": train_seconds, "total_seconds": total_seconds,
               "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table, rows, columns = _table(results)
    report = _markdown(results, rows, columns)
    (out / "report.md").write_text(report)
    probe_rows = {LABELS[m]: {t: r["linear_probe"] for t, r in per_task.items()} for m, per_task in transfer.items()}
    bar_chart(probe_rows, list(tasks), out / "transfer.png",
              title="Linear-probe transfer of frozen backbones (digits demo)")
    results["table"] = table
    return results


def _table(results: dict):
    tasks = list(next(iter(results["transfer"].values())))
    k = results["settings"]["knn_k"]
    columns = [f"{t} probe" for t in tasks] + [f"{t} kNN@{k}" for t in tasks] + ["train img/s"]
    rows = {}
    for model, per_task in results["transfer"].items():
        row = {f"{t} probe": per_task[t]["linear_probe"] for t in tasks}
        row.update({f"{t} kNN@{k}": per_task[t][f"knn@{k}"] for t in tasks})
        training = results["training"].get(model)
        row["train img/s"] = training["images_per_sec"] if training else None
        rows[LABELS[model]] = row
    return format_table(rows, columns), rows, columns


def _markdown(results: dict, rows: dict, columns: list[str]) -> str:
    s = results["settings"]
    teachers = "\n".join(f"- {LABELS[name]}: {acc:.3f} on its own test split"
                         for name, acc in results["teacher_test_accuracy"].items())
    training = "\n".join(f"- {name}: {v['steps']} steps, final loss {v['final_loss']:.4f}, "
                         f"{v['images_per_sec']:.0f} images/s, {v['wall_time_s']:.1f} s"
                         for name, v in results["training"].items())
    return f"""# rcfast demo: representation consolidation on digits

Backbone `{BACKBONE}` (width {s['width']}) for every model; teachers trained {s['teacher_steps']} steps,
students {s['student_steps']} steps, batch {s['batch_size']}, AdamW lr {s['lr']} (warm-up + cosine),
temperature {s['temperature']}, precision {s['precision']}, seed {s['seed']}, {results['threads']} torch thread(s).
Downstream scores: frozen backbone, linear probe (standardised features, logistic regression, C chosen
on a validation split of train) and cosine kNN (k={s['knn_k']}), on held-out digits never seen in training.

{markdown_table(rows, columns)}

![linear-probe transfer](transfer.png)

Teacher accuracy:
{teachers}

Training runs:
{training}

Training took {results['train_seconds']:.0f} s; the whole demo {results['total_seconds']:.0f} s.
Configs of every run are in `configs/`; rerun one with `rcfast consolidate --config configs/<run>.yaml`.
"""
