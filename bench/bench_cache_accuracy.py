"""Accuracy: RepCon from a top-k teacher cache vs online teachers, on the digits demo (several seeds).

The demo's data and teachers (``rcfast.train.demo``: a generalist of 10 digits
and two task teachers of 5) are built once; then, for each seed, the demo's
RepCon student is trained with online teachers and from top-k fp16 caches
(``--ks``; a teacher with at most k classes is stored whole; ``--tail both``,
the default: each k once plain -- the loss renormalises the k entries -- and
once with ``tail_mass``, ``top{k}+tail``), all with the same step budget, and every student backbone is frozen and scored on the demo's
downstream tasks (linear probe and kNN, as ``rcfast demo`` does). The table
gives mean +- std over the seeds per variant, and the mean +- std of each seed's
paired difference to online (same seed: same data order and initialisation).

    python bench/bench_cache_accuracy.py [--quick] [--seeds 3] [--ks 1 2 4] [--tail both] [--teacher-steps 150]
        [--student-steps 200] [--batch-size 64]

prints a markdown table (and, without --quick, writes bench/results/cache_accuracy.md).
"""
from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _train(config) -> Path:
    from rcfast.train import Consolidator

    shutil.rmtree(config.train.out_dir, ignore_errors=True)
    trainer = Consolidator.from_config(config)
    try:
        return Path(trainer.fit()["final"])
    finally:
        trainer.close()


def _backbone(final: Path, width: int):
    import torch

    from rcfast.models import build_model
    from rcfast.train.teachers import extract_model_state

    model = build_model("small_cnn", width=width)
    state = extract_model_state(torch.load(final, weights_only=True))
    model.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    return model


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {std:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tail", default="both", choices=("off", "on", "both"),
                        help="plain top-k caches, tail-mass ones, or both (default)")
    parser.add_argument("--teacher-steps", type=int, default=None)
    parser.add_argument("--student-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="where data, teachers, caches and runs go (default: temp)")
    args = parser.parse_args()
    if args.seeds <= 0 or any(k <= 0 for k in args.ks):
        parser.error("--seeds and every --ks must be positive")

    from rcfast.data import demo_dataset
    from rcfast.eval import evaluate_transfer
    from rcfast.train.demo import DemoSettings, _labeled, demo_configs
    from rcfast.train.teacher_cache import build_teacher_cache

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    settings.teacher_steps = args.teacher_steps or settings.teacher_steps
    settings.student_steps = args.student_steps or settings.student_steps
    settings.batch_size = args.batch_size or settings.batch_size
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rcfast-cache-accuracy-"))
    started = time.perf_counter()
    try:
        manifest = demo_dataset(work / "data")
        configs = demo_configs(manifest, work, settings)
        for name in ("teacher_generalist", "teacher_task_a", "teacher_task_b"):
            print(f"[cache_accuracy] training {name}", file=sys.stderr, flush=True)
            configs[name].train.progress = False
            _train(configs[name])
        tasks = manifest["downstream"]
        task_data = {name: (_labeled(task["train"], settings), _labeled(task["test"], settings))
                     for name, task in tasks.items()}
        tails = {"off": [""], "on": ["+tail"], "both": ["", "+tail"]}[args.tail]
        variants = ["online"] + [f"top{k}{tail}" for k in args.ks for tail in tails]
        scores: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
        for seed in range(args.seeds):
            for variant in variants:
                config = copy.deepcopy(configs["repcon"])
                config.train.seed = seed
                config.train.progress = False
                config.train.out_dir = str(work / "runs" / f"repcon_seed{seed}_{variant}")
                if variant != "online":
                    cache = work / "caches" / f"seed{seed}_{variant.replace('+', '_')}"
                    shutil.rmtree(cache, ignore_errors=True)
                    k, _, tail = variant[3:].partition("+")
                    build_teacher_cache(config, cache, top_k=int(k), tail_mass=bool(tail), progress=False,
                                        log=lambda *a: None)
                    config.teacher_cache = str(cache)
                backbone = _backbone(_train(config), settings.width)
                for task, (train_data, test_data) in task_data.items():
                    result = evaluate_transfer(backbone, train_data, test_data, knn_k=settings.knn_k, seed=seed)
                    for metric in ("linear_probe", f"knn@{settings.knn_k}"):
                        scores[variant].setdefault(f"{task} {metric}", []).append(result[metric])
                print(f"[cache_accuracy] seed {seed} {variant}: " + ", ".join(
                    f"{c} {v[-1]:.3f}" for c, v in scores[variant].items()), file=sys.stderr, flush=True)
        for train_data, test_data in task_data.values():
            train_data.close()
            test_data.close()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    columns = list(scores["online"])
    lines = ["# RepCon from a top-k teacher cache vs online teachers (digits demo)", "",
             f"Teachers: generalist (10 classes), task A and task B (5 each), {settings.teacher_steps} steps; "
             f"RepCon student `small_cnn` width {settings.width}, {settings.student_steps} steps, batch "
             f"{settings.batch_size}, T = {settings.temperature}; seeds 0..{args.seeds - 1} (the seed sets the "
             "student's initialisation and the data order; the teachers are the same). Caches: top-k fp16 "
             "(a teacher with <= k classes stored whole; `+tail`: built with the tail mass, the other classes keep "
             "their softened mass, spread evenly). Frozen backbones scored on the demo's downstream "
             f"tasks. Mean +- std over {args.seeds} seeds; 'diff' is the mean +- std of each seed's paired "
             "difference to online.", "",
             "| variant | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for variant in variants:
        lines.append(f"| {variant} | " + " | ".join(_mean_std(scores[variant][c]) for c in columns) + " |")
    for variant in variants[1:]:
        diffs = {c: [a - b for a, b in zip(scores[variant][c], scores["online"][c])] for c in columns}
        lines.append(f"| {variant} diff | " + " | ".join(_mean_std(diffs[c]) for c in columns) + " |")
    lines += ["", f"Total {time.perf_counter() - started:.0f} s.", ""]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        (REPO / "bench" / "results" / "cache_accuracy.md").write_text(
            text + f"\nReproduce: `python bench/bench_cache_accuracy.py {' '.join(sys.argv[1:])}` (from the repository "
            "root).\n")


if __name__ == "__main__":
    main()
