"""Evidence for selective cross-task distillation: does the OT score find the teacher that helps?

On the glyph data (``rcfast.data.glyphs``; characters = classes, scripts =
domains; rendered at 16 x 16 without photographs, see ``RENDER``), nothing
downloaded:

- **target task**: 20 Latin characters. Per seed, a labeled sample of
  10 images per class (other images for each seed), 30 test images
  per class, and 40 unlabeled images per class (the distillation data).
- **repository**: teachers of known relatedness, each trained once (seed 0)
  with cross-entropy on 60 images per class of its own label space:
  ``latin_merged`` (the 20 target characters, other images, merged in pairs
  into 10 classes), ``latin_other`` (20 other Latin characters),
  ``greek``, ``cyrillic``, ``armenian``, ``arabic``, ``braille`` (20 of each
  script), ``latin_noisy`` (latin_other's data with half of the labels
  shuffled), ``untrained`` (a random network). No teacher shares the
  target's label space.
- **ground truth** (per seed and teacher): the target test accuracy of a
  student trained from scratch for ``--student-steps`` steps with
  ``ot_distill`` alone from that teacher over the unlabeled target images;
  the labels enter only through the teacher's prototype cost matrix
  (:func:`rcfast.select.class_cost_matrix` on the labeled sample). This is
  what the teacher transfers through the transport. Also trained per seed:
  ``cross_entropy`` on the labeled sample alone, and ``cross_entropy`` +
  ``ot_distill`` from the teacher the OT score ranks first.
- **scores** (per seed and teacher, from the labeled sample only, no
  training): OT transport cost (:func:`rcfast.select.rank_teachers`,
  ``method="ot"``), LEEP, and the linear-probe accuracy of the teacher's
  features. Each method's seconds include its pass over the sample.

Reported: per seed, the Spearman correlation between each score (OT negated,
as lower is better) and the ground truth over the teachers, mean +- std over
seeds; the accuracy lost by taking each method's top teacher instead of the
best one; the students' accuracies; and the seconds of each method.

    python bench/ot_ranking.py [--root ~/.cache/rcfast/ot_ranking] [--seeds 0 1 2] [--out bench/results/ot_ranking.md]
    python bench/ot_ranking.py --from-json bench/results/ot_ranking.json   # rebuild the report only
    python bench/ot_ranking.py --ablate-ot bench/results/ot_ranking.json   # other OT options, same ground truth

The default size (9 teachers, 3 seeds, 200 student steps) took 28.7 min on the shared 2-core machine at a
load average of 11-13: rendering ~1 min, the nine teachers 6.5 min (kept under ``--root`` and reused by
later runs), ~7 min per seed (nine ground-truth students). ``--seeds 0 1`` takes ~22 min there.

Rendered images and trained teachers are kept under ``--root`` and reused.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python bench/ot_ranking.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from rcfast.data import ProxyImages  # noqa: E402
from rcfast.data.glyphs import RenderParams, glyph_dataset, split_classes  # noqa: E402
from rcfast.eval import classifier_accuracy  # noqa: E402
from rcfast.models import build_classifier  # noqa: E402
from rcfast.select import rank_teachers  # noqa: E402
from rcfast.train import Consolidator  # noqa: E402
from rcfast.train.checkpoint import atomic_save  # noqa: E402
from rcfast.train.config import (DataConfig, OptimConfig, RunConfig, StudentConfig, TaskConfig,  # noqa: E402
                                 TeacherConfig, TrainConfig)
from rcfast.train.runtime import apply_runtime  # noqa: E402
from rcfast.train.teachers import load_teacher  # noqa: E402

CLASSES = 20
IMAGE_SIZE = 16
# Fonts, size, stroke, shear, shift, blur and noise vary as by default; no photographs and less rotation,
# so that 16 x 16 images and a CPU-sized budget learn something in a few hundred steps.
RENDER = RenderParams(image_size=IMAGE_SIZE, max_rotation=8.0, p_background_photo=0.0, p_ink_photo=0.0)
BACKBONE, WIDTH = "small_cnn", 8
SCRIPT_TEACHERS = ("greek", "cyrillic", "armenian", "arabic", "braille")
METHODS = ("ot", "leep", "linear_probe")
MAX_SEEDS = 5
SHOTS = 10  # labeled target images per class and seed
TEACHER_IMAGES = 60  # training images per teacher class
TEACHER_BATCH = 32


# --------------------------------------------------------------------------- data
def _relabelled(source: Path, dest: Path, label_of) -> Path:
    """A class-folder tree whose files are those of ``source``, filed under ``label_of(class, file)``."""
    if dest.exists():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for position, class_dir in enumerate(sorted(p for p in source.iterdir() if p.is_dir())):
        for image in sorted(class_dir.iterdir()):
            target = tmp / f"class_{label_of(position, image.name):03d}" / f"{class_dir.name}_{image.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(image, target)
            except OSError:
                shutil.copyfile(image, target)
    os.replace(tmp, dest)
    return dest


def build_data(root: Path) -> dict:
    """Render (once) every image the benchmark reads; return the folders."""
    target, latin_other = split_classes("Latin", [CLASSES, CLASSES], seed=0)
    shots = {f"s{k}": (SHOTS * k, SHOTS * (k + 1)) for k in range(MAX_SEEDS)}  # another sample per seed

    def render(folder: str, classes, splits, labeled=True):
        return glyph_dataset(root / folder, classes, splits=splits, labeled=labeled, render=RENDER,
                             image_size=IMAGE_SIZE)

    target_ds = render("target", target, dict(shots, test=(100, 130)))
    proxy_ds = render("target_proxy", target, {"proxy": (200, 240)}, labeled=False)
    teacher_splits = {"train": (300, 300 + TEACHER_IMAGES)}
    sources = {"latin_other": render("latin_other", latin_other, teacher_splits)}
    for script in SCRIPT_TEACHERS:
        sources[script] = render(script, split_classes(script.capitalize(), [CLASSES], seed=0)[0], teacher_splits)
    merged_source = render("latin_target_other_images", target, teacher_splits)
    teachers = {name: Path(ds.splits["train"]) for name, ds in sources.items()}
    teachers["latin_merged"] = _relabelled(Path(merged_source.splits["train"]), root / "latin_merged",
                                           lambda position, _: position // 2)
    shuffle = np.random.default_rng(0)
    noisy = {}

    def noisy_label(position, name):  # half of the images get a random label (fixed by the seed)
        if (position, name) not in noisy:
            noisy[(position, name)] = int(shuffle.integers(CLASSES)) if shuffle.random() < 0.5 else position
        return noisy[(position, name)]

    teachers["latin_noisy"] = _relabelled(teachers["latin_other"], root / "latin_noisy", noisy_label)
    return {"target": target_ds, "proxy": Path(proxy_ds.splits["proxy"]), "teachers": teachers}


def num_classes(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_dir())


def labeled(folder, args, shuffle=False) -> ProxyImages:
    return ProxyImages(str(folder), image_size=IMAGE_SIZE, batch_size=args.batch_size, device="cpu",
                       augment="none", labels=True, shuffle=shuffle, drop_last=False, backend="pil", num_threads=0)


# --------------------------------------------------------------------------- training
def _data_config(batch_size: int, source: str = "") -> DataConfig:
    return DataConfig(source=source, image_size=IMAGE_SIZE, batch_size=batch_size, augment="none",
                      shuffle=True, backend="pil", num_threads=0, drop_last=True)


def _train_config(args, out: Path, steps: int, seed: int) -> TrainConfig:
    return TrainConfig(max_steps=steps, seed=seed, num_threads=args.threads, log_every=max(1, steps // 5),
                       checkpoint_every=0, out_dir=str(out), resume="none", progress=False)


def fit(config: RunConfig) -> Consolidator:
    trainer = Consolidator.from_config(config)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def train_teacher(name: str, folder: Path, root: Path, args) -> TeacherConfig:
    out = root / "runs" / f"teacher_{name}"
    classes = num_classes(folder)
    config = TeacherConfig(name=name, builder=BACKBONE, checkpoint=str(out / "final.pt"), num_classes=classes,
                           builder_kwargs={"width": WIDTH})
    if not (out / "final.pt").is_file():
        fit(RunConfig(student=StudentConfig(backbone=BACKBONE, backbone_kwargs={"width": WIDTH}),
                      tasks=[TaskConfig(name=name, source=str(folder), num_classes=classes)],
                      data=_data_config(TEACHER_BATCH), objective=[{"term": "cross_entropy"}],
                      optim=OptimConfig(lr=2e-3, warmup_steps=20),
                      train=_train_config(args, out, args.teacher_steps, seed=0)))
    return config


def untrained_teacher(root: Path) -> TeacherConfig:
    path = root / "runs" / "teacher_untrained" / "final.pt"
    if not path.is_file():
        torch.manual_seed(0)
        atomic_save(build_classifier(BACKBONE, CLASSES, width=WIDTH).state_dict(), path)
    return TeacherConfig(name="untrained", builder=BACKBONE, checkpoint=str(path), num_classes=CLASSES,
                         builder_kwargs={"width": WIDTH})


def train_student(sample: Path, data: dict, seed: int, out: Path, args, teacher: TeacherConfig | None = None,
                  cost: Path | None = None, cross_entropy: bool = True) -> float:
    """Target test accuracy of a student trained from scratch on ``cross_entropy`` over the labeled
    sample and/or ``ot_distill`` from ``teacher`` over the unlabeled target images."""
    objective, teachers, tasks = [], [], []
    if cross_entropy:
        objective.append({"term": "cross_entropy", "head": "target", "data": "target"})
        tasks = [TaskConfig(name="target", source=str(sample), num_classes=CLASSES)]
    if teacher is not None:
        objective.append({"term": "ot_distill", "cost": str(cost), "teacher": teacher.name, "head": "target"})
        teachers = [teacher]
    trainer = fit(RunConfig(student=StudentConfig(backbone=BACKBONE, backbone_kwargs={"width": WIDTH},
                                                  heads={"target": CLASSES}),
                            teachers=teachers, tasks=tasks,
                            data=_data_config(args.batch_size, str(data["proxy"]) if teacher is not None else ""),
                            objective=objective, optim=OptimConfig(lr=2e-3, warmup_steps=20),
                            train=_train_config(args, out, args.student_steps, seed=seed)))
    # The student has the one head "target": its output is the target task's logits.
    return classifier_accuracy(trainer.student, labeled(data["target"].splits["test"], args))


# --------------------------------------------------------------------------- one seed
def run_seed(seed: int, teachers: dict, data: dict, root: Path, args) -> dict:
    sample = Path(data["target"].splits[f"s{seed}"])
    runs = root / "runs" / f"seed{seed}"
    models = {name: load_teacher(cfg) for name, cfg in teachers.items()}
    scores, seconds, costs = {}, {}, {}
    for method in METHODS:
        start = time.perf_counter()
        records = rank_teachers(models, labeled(sample, args), method=method, num_classes=CLASSES, seed=seed)
        seconds[method] = time.perf_counter() - start
        scores[method] = {r.name: r.score for r in records}
        if method == "ot":
            pick = records[0].name
            for r in records:
                costs[r.name] = atomic_save(r.cost_matrix, root / "costs" / f"seed{seed}" / f"{r.name}.pt")
    accuracy, start = {}, time.perf_counter()
    for name, cfg in teachers.items():  # the ground truth: ot_distill alone, from each teacher
        accuracy[name] = train_student(sample, data, seed, runs / f"ot_{name}", args, cfg, costs[name],
                                       cross_entropy=False)
        print(f"  seed {seed} {name}: accuracy {accuracy[name]:.3f}, ot {scores['ot'][name]:.4f}, "
              f"leep {scores['leep'][name]:.3f}, probe {scores['linear_probe'][name]:.3f}", flush=True)
    seconds["ground_truth"] = time.perf_counter() - start
    ce_only = train_student(sample, data, seed, runs / "ce_only", args)
    ce_and_ot = train_student(sample, data, seed, runs / f"ce_ot_{pick}", args, teachers[pick], costs[pick])
    print(f"  seed {seed}: cross-entropy only {ce_only:.3f}; cross-entropy + ot_distill from the OT pick {pick} "
          f"{ce_and_ot:.3f}", flush=True)
    return {"seed": seed, "scores": scores, "accuracy": accuracy, "ce_only": ce_only, "pick": pick,
            "ce_and_ot": ce_and_ot, "seconds": seconds}


# Options of the OT score (all documented rank_teachers arguments) compared by --ablate-ot. Chosen after the
# main run had been seen: an ablation to say which way to look, not a tuned result.
OT_VARIANTS = {
    "cosine cost, temperature 1 (the default, the main run)": {},
    "euclidean cost": {"metric": "euclidean"},
    "temperature 4": {"temperature": 4.0},
    "label smoothing 0.1": {"label_smoothing": 0.1},
}


def ablate_ot(runs: list[dict], teachers: dict, data: dict, args) -> str:
    """Spearman (mean +- std over the saved seeds) of each OT_VARIANTS score with the saved ground truth."""
    models = {name: load_teacher(cfg) for name, cfg in teachers.items()}
    lines = ["# OT score options vs the ground truth of `bench/results/ot_ranking.json` (post-hoc ablation)", "",
             "Generated by `python bench/ot_ranking.py --ablate-ot bench/results/ot_ranking.json`: the same "
             "teachers, labeled samples and ground truth as the main run; only the OT score's options change. "
             "The variants were chosen after the main run had been seen, so this says which way to look, "
             "not which setting is best.", "",
             "| OT score | Spearman with the ground truth | per seed | top picks | accuracy lost by its top pick |",
             "|---|---:|---|---|---:|"]
    for label, options in OT_VARIANTS.items():
        rhos, picks, regrets = [], [], []
        for run in runs:
            sample = Path(data["target"].splits[f"s{run['seed']}"])
            records = rank_teachers(models, labeled(sample, args), method="ot", num_classes=CLASSES, **options)
            rhos.append(spearman({r.name: r.score for r in records}, run["accuracy"], higher_is_better=False))
            picks.append(records[0].name)
            regrets.append(max(run["accuracy"].values()) - run["accuracy"][picks[-1]])
        spread = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        lines.append(f"| {label} | {statistics.mean(rhos):.2f} ± {spread(rhos):.2f} | "
                     f"{' / '.join(f'{r:.2f}' for r in rhos)} | {', '.join(picks)} | "
                     f"{statistics.mean(regrets):.3f} ± {spread(regrets):.3f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def spearman(score: dict, accuracy: dict, higher_is_better: bool) -> float:
    from scipy.stats import spearmanr

    names = sorted(accuracy)
    values = [score[n] if higher_is_better else -score[n] for n in names]
    return float(spearmanr(values, [accuracy[n] for n in names]).statistic)


def summarise(runs: list[dict]) -> dict:
    def mean_std(values):
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    better = {"ot": False, "leep": True, "linear_probe": True}
    summary = {"methods": {}, "teachers": {}}
    for method in METHODS:
        rho = [spearman(r["scores"][method], r["accuracy"], better[method]) for r in runs]
        regret, picks = [], []
        for r in runs:
            chosen = (max if better[method] else min)(r["scores"][method], key=r["scores"][method].get)
            picks.append(chosen)
            regret.append(max(r["accuracy"].values()) - r["accuracy"][chosen])
        summary["methods"][method] = {"spearman": mean_std(rho), "spearman_per_seed": rho, "regret": mean_std(regret),
                                      "picks": picks, "seconds": mean_std([r["seconds"][method] for r in runs])}
    for name in runs[0]["accuracy"]:
        summary["teachers"][name] = {
            "accuracy": mean_std([r["accuracy"][name] for r in runs]),
            **{m: mean_std([r["scores"][m][name] for r in runs]) for m in METHODS}}
    summary["ce_only"] = mean_std([r["ce_only"] for r in runs])
    summary["ce_and_ot"] = mean_std([r["ce_and_ot"] for r in runs])
    summary["ot_pick_alone"] = mean_std([r["accuracy"][r["pick"]] for r in runs])
    summary["best_alone"] = mean_std([max(r["accuracy"].values()) for r in runs])
    # Paired by seed (same labeled sample and test set): accuracy gained over cross-entropy on the sample alone.
    paired = {"best_alone": [max(r["accuracy"].values()) - r["ce_only"] for r in runs],
              "ot_pick_alone": [r["accuracy"][r["pick"]] - r["ce_only"] for r in runs],
              "ce_and_ot": [r["ce_and_ot"] - r["ce_only"] for r in runs]}
    summary["gain_over_ce"] = {k: {"mean_std": mean_std(v), "per_seed": v} for k, v in paired.items()}
    summary["ground_truth_seconds"] = mean_std([r["seconds"]["ground_truth"] for r in runs])
    return summary


def report(summary: dict, meta: dict) -> str:
    """The markdown report of ``summary``; ``meta`` says how it was run (see :func:`run_meta`)."""
    pm = lambda ms, f="{:.3f}": f"{f.format(ms[0])} ± {f.format(ms[1])}"  # noqa: E731
    args, load = argparse.Namespace(**meta["args"]), meta["load"]
    n = len(args.seeds)
    lines = [
        "# Selective cross-task distillation: ranking a teacher repository (glyphs)",
        "",
        "Generated by `python bench/ot_ranking.py` (method in its docstring).",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} thread(s); load average before / after: {load[0]} / {load[1]}; {meta['minutes']:.1f} min in all",
        f"- target: {CLASSES} Latin characters ({IMAGE_SIZE} x {IMAGE_SIZE}), {SHOTS} labeled images per class "
        f"per seed, 30 test and 40 unlabeled images per class; {len(summary['teachers'])} teachers "
        f"({args.teacher_steps} steps of batch {TEACHER_BATCH}, cross-entropy on {TEACHER_IMAGES} images per "
        f"class); seeds {args.seeds} (each: another labeled sample, cost matrices and student initialisation)",
        f"- students: {BACKBONE} width {WIDTH} from scratch, {args.student_steps} steps of batch {args.batch_size}; "
        "ground truth = `ot_distill` alone (eps 0.05, temperature 1) over the unlabeled images",
        "",
        f"## How well each score ranks the teachers (mean ± std over {n} seeds)",
        "",
        "| method | Spearman with the ground truth | per seed | accuracy lost by its top pick | its picks | "
        "seconds (all teachers) |",
        "|---|---:|---|---:|---|---:|",
    ]
    for method, m in summary["methods"].items():
        per_seed = " / ".join(f"{rho:.2f}" for rho in m["spearman_per_seed"])
        lines.append(f"| {method} | {pm(m['spearman'], '{:.2f}')} | {per_seed} | {pm(m['regret'])} | "
                     f"{', '.join(m['picks'])} | {pm(m['seconds'], '{:.1f}')} |")
    lines.append(f"| ground truth: a student per teacher | 1 | | 0 | | "
                 f"{pm(summary['ground_truth_seconds'], '{:.0f}')} |")
    lines += ["", "## Per teacher (mean ± std over seeds)", "",
              "| teacher | target accuracy of its ot_distill student | OT cost (lower = related) | LEEP | "
              "linear probe |", "|---|---:|---:|---:|---:|"]
    order = sorted(summary["teachers"], key=lambda t: -summary["teachers"][t]["accuracy"][0])
    for name in order:
        t = summary["teachers"][name]
        lines.append(f"| {name} | {pm(t['accuracy'])} | {pm(t['ot'], '{:.4f}')} | {pm(t['leep'])} | "
                     f"{pm(t['linear_probe'])} |")
    lines += ["", f"## Distilling from the OT pick vs cross-entropy on the labeled sample (chance {1 / CLASSES:.2f})",
              "", "| student | target accuracy | gain over cross-entropy alone, paired by seed | per seed |",
              "|---|---:|---:|---|",
              f"| cross-entropy on the labeled sample only | {pm(summary['ce_only'])} | | |"]
    for key, label in (("ot_pick_alone", "ot_distill from the OT-picked teacher, no label"),
                       ("best_alone", "ot_distill from the seed's best teacher (by ground truth), no label"),
                       ("ce_and_ot", "cross-entropy + ot_distill from the OT-picked teacher")):
        gain = summary["gain_over_ce"][key]
        per_seed = " / ".join(f"{g:+.3f}" for g in gain["per_seed"])
        mean, std = gain["mean_std"]
        lines.append(f"| {label} | {pm(summary[key])} | {mean:+.3f} ± {std:.3f} | {per_seed} |")
    return "\n".join(lines) + "\n"


def run_meta(args, load: tuple[str, str], minutes: float) -> dict:
    """How the run was made: stored in the JSON so that ``--from-json`` rebuilds the same report."""
    keys = ("seeds", "teacher_steps", "student_steps", "batch_size", "threads", "teachers")
    return {"args": {k: getattr(args, k) for k in keys}, "load": list(load), "minutes": minutes}


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())  # Linux: the report says how busy the machine was


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cache = Path(os.environ.get("RCFAST_CACHE_DIR", Path.home() / ".cache" / "rcfast"))
    parser.add_argument("--root", default=str(cache / "ot_ranking"), help="images, teachers and runs (reused)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--student-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--teachers", nargs="+", default=None, help="a subset of the repository (default: all)")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "ot_ranking.md"))
    parser.add_argument("--from-json", default=None, metavar="JSON",
                        help="rebuild the report from a saved run (its .json) without training anything")
    parser.add_argument("--ablate-ot", default=None, metavar="JSON",
                        help="score the saved run's seeds with other OT options (OT_VARIANTS) against its ground "
                             "truth; writes <out>_ablation.md; trains nothing but missing teachers")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.from_json is not None:
        saved = json.loads(Path(args.from_json).read_text())
        write_report(saved["runs"], saved["meta"], out)
        return 0
    if any(not 0 <= s < MAX_SEEDS for s in args.seeds):
        parser.error(f"seeds must be in [0, {MAX_SEEDS})")

    start, load_before = time.perf_counter(), _load()
    apply_runtime(TrainConfig(num_threads=args.threads, seed=0))  # this script owns its process
    root = Path(args.root).expanduser()
    if args.ablate_ot is not None:
        saved = json.loads(Path(args.ablate_ot).read_text())
        for key in ("teacher_steps", "batch_size", "teachers"):  # the saved run's repository
            setattr(args, key, saved["meta"]["args"][key])
    data = build_data(root)
    teachers = {name: train_teacher(name, folder, root, args) for name, folder in data["teachers"].items()
                if args.teachers is None or name in args.teachers}
    if args.teachers is None or "untrained" in args.teachers:
        teachers["untrained"] = untrained_teacher(root)
    if args.ablate_ot is not None:
        text = ablate_ot(saved["runs"], teachers, data, args)
        _write_atomic(out.with_name(out.stem + "_ablation.md"), text)
        print(text)
        return 0
    runs = [run_seed(seed, teachers, data, root, args) for seed in args.seeds]
    write_report(runs, run_meta(args, (load_before, _load()), (time.perf_counter() - start) / 60), out)
    return 0


def write_report(runs: list[dict], meta: dict, out: Path) -> None:
    """Write the report (``out``) and every number (``out`` with ``.json``), each atomically; print the report."""
    summary = summarise(runs)
    text = report(summary, meta)
    _write_atomic(out, text)
    _write_atomic(out.with_suffix(".json"), json.dumps({"meta": meta, "runs": runs, "summary": summary}, indent=1))
    print(text)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
