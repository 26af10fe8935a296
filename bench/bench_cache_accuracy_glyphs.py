"""Accuracy: RepCon from a top-k teacher cache vs online teachers, on the glyph transfer benchmark.

The transfer benchmark (``rcfast benchmark transfer``) trains, per seed, a RepCon
student (b) from two specialist teachers (60 classes each at the medium size)
and a generalist (300 classes) with online teachers, and scores its frozen
backbone by few-shot linear probes on four downstream tasks. Here, for each
seed of such a benchmark folder (run first, or continued, by this script) and
each k, the same RepCon run -- its config file, so the same seed, data order,
initialisation and budget -- is trained again from a top-k fp16 teacher cache
(``build_teacher_cache``), and scored by the benchmark's own scoring; with
``--tail both`` (default) twice: once from a plain top-k cache (the loss
renormalises the k entries) and once from one built with ``tail_mass=True``
(``top{k}+tail``: the classes outside the k keep their mass, spread evenly).
Each seed's difference to the online RepCon is paired (same seed, same
everything but the teachers' cache), and compared with the seed spread of
online RepCon.

    python bench/bench_cache_accuracy_glyphs.py [--size medium] [--seeds 3] [--ks 8 32] [--tail both] [--out DIR]

prints a markdown table (and writes bench/results/cache_accuracy_glyphs.md unless
``--size quick``). The benchmark folder ``DIR`` (default
``rcfast-benchmark-<size>``) is reused: finished seeds, caches and runs are kept.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def probe_score(transfer: dict, shots) -> tuple[float, dict[str, float]]:
    """(mean over tasks, {task: score}) of the linear-probe accuracy averaged over the shot counts."""
    per_task = {task: statistics.mean(scores[f"probe@{n}"] for n in shots) for task, scores in transfer.items()}
    return statistics.mean(per_task.values()), per_task


def mean_std(values) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def train_from_cache(config_path: Path, run_dir: Path, k: int, tail: bool):
    """Train the seed's RepCon config from a top-k cache (with its tail mass if ``tail``) in ``run_dir``; return its final checkpoint."""
    from rcfast.train import Consolidator, load_config
    from rcfast.train.teacher_cache import build_teacher_cache

    config = load_config(config_path)
    config.train.out_dir = str(run_dir / "run")
    config.train.progress = False
    # Idempotent: a finished cache is only checked (and its summary returned).
    summary = build_teacher_cache(config, run_dir / "cache", top_k=k, tail_mass=tail, progress=False,
                                  log=lambda *a: None)
    final = run_dir / "run" / "final.pt"
    if final.exists():
        return final, summary
    config.teacher_cache = str(run_dir / "cache")
    trainer = Consolidator.from_config(config)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return final, summary


def top_k_mass(config_path: Path, ks, images: int = 512) -> dict[str, dict[int, float]]:
    """``{teacher: {k: mean share of its softened distribution in its top k}}`` on the run's first proxy images.

    At the run's temperature (the ``multihead_kd`` term's): what a top-k cache keeps of each teacher's
    target, before the loss renormalises the k entries.
    """
    import torch

    from rcfast.data import ProxyImages
    from rcfast.train import load_config
    from rcfast.train.teachers import load_teacher

    config = load_config(config_path)
    temperature = next(t.get("temperature", 4.0) for t in config.objective if t["term"] == "multihead_kd")
    data = ProxyImages(config.data.source, image_size=config.data.image_size, batch_size=images, augment=None,
                       shuffle=False, drop_last=False, device="cpu")
    try:
        batch = next(iter(data))
    finally:
        data.close()
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    out = {}
    for teacher in config.teachers:
        model = load_teacher(teacher, torch.device("cpu"))
        with torch.inference_mode():
            tau = float(temperature[teacher.name] if isinstance(temperature, dict) else temperature)
            p = torch.softmax(model(x).float() / tau, dim=1).sort(dim=1, descending=True).values
        out[teacher.name] = {k: float(p[:, :k].sum(1).mean()) for k in ks}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="medium", choices=("quick", "medium", "full"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--tail", default="both", choices=("off", "on", "both"),
                        help="plain top-k caches, tail-mass ones, or both (default)")
    parser.add_argument("--out", default=None, help="the transfer benchmark folder (default rcfast-benchmark-<size>)")
    args = parser.parse_args()
    tails = {"off": [False], "on": [True], "both": [False, True]}[args.tail]
    variants = [(k, tail) for k in args.ks for tail in tails]
    name = lambda k, tail: f"top{k}+tail" if tail else f"top{k}"  # noqa: E731
    if args.seeds <= 0 or any(k <= 0 for k in args.ks):
        parser.error("--seeds and every --ks must be positive")

    from rcfast.data.glyphs.protocol import protocol_data
    from rcfast.train.experiment import load_backbone
    from rcfast.train.transfer_benchmark import run_transfer_benchmark
    from rcfast.train.transfer_benchmark.evaluate import score_backbones
    from rcfast.train.transfer_benchmark.runs import recipe_for
    from rcfast.train.transfer_benchmark.settings import BenchmarkSettings

    started = time.perf_counter()
    out = Path(args.out or f"rcfast-benchmark-{args.size}").resolve()
    settings = BenchmarkSettings.preset(args.size, seeds=args.seeds)
    log(f"[cache_accuracy_glyphs] the transfer benchmark in {out} (finished seeds are kept)")
    results = run_transfer_benchmark(out, settings, log=log,
                                     command=f"rcfast benchmark transfer --size {args.size} --seeds {args.seeds} "
                                             f"--out {out}")
    settings = dataclasses.replace(settings, protocol=settings.protocol.resolve())
    # A k that holds every class of every teacher makes a dense cache: it has no tail to keep.
    most_classes = max(settings.protocol.general_classes, settings.protocol.specialist_classes)
    variants = [(k, tail) for k, tail in variants if not (tail and k >= most_classes)]
    shots = settings.shots
    online = {r["seed"]: probe_score(r["transfer"]["repcon"], shots) for r in results["per_seed"]}
    generalist = {r["seed"]: probe_score(r["transfer"]["teacher_general"], shots)[0] for r in results["per_seed"]}
    cached: dict[int, dict[str, tuple[float, dict]]] = {}
    cache_bytes = {}
    mass: dict[int, dict[str, dict[int, float]]] = {}
    for seed in settings.seed_list:
        data = protocol_data(out / "data" / f"seed_{seed}", settings.protocol, seed, overwrite=False, progress=False)
        recipe = recipe_for(settings, seed)
        config_path = out / "seeds" / str(seed) / "configs" / "repcon.yaml"
        mass[seed] = top_k_mass(config_path, args.ks)
        backbones = {}
        for k, tail in variants:
            final, summary = train_from_cache(config_path, out / "cache_accuracy" / f"seed_{seed}" /
                                              name(k, tail).replace("+", "_"), k, tail)
            cache_bytes[name(k, tail)] = summary["bytes_per_image"]
            backbones[name(k, tail)] = load_backbone(final, recipe.backbone, width=recipe.width)
        scores = score_backbones(data, backbones, settings, recipe, seed, log=log)
        cached[seed] = {v: probe_score(scores[v], shots) for v in backbones}
        log(f"[cache_accuracy_glyphs] seed {seed}: online {online[seed][0]:.3f}, " + ", ".join(
            f"{v} {cached[seed][v][0]:.3f}" for v in backbones))

    seeds = settings.seed_list
    tasks = list(online[seeds[0]][1])
    online_means = [online[s][0] for s in seeds]
    lines = ["# RepCon from a top-k teacher cache vs online teachers (glyph transfer benchmark)", "",
             f"`python bench/bench_cache_accuracy_glyphs.py --size {args.size} --seeds {args.seeds} --ks "
             f"{' '.join(map(str, args.ks))} --tail {args.tail}`: the transfer benchmark's RepCon student (b) ({args.size} size: "
             "two specialist teachers and a generalist, "
             f"{settings.protocol.specialist_classes}/{settings.protocol.specialist_classes}/"
             f"{settings.protocol.general_classes} classes; {settings.student_steps} steps) trained from online "
             "teachers (the benchmark's own run) and, with the same config, from a top-k fp16 cache (`topk`: the loss "
             "renormalises the k entries; `topk+tail`: built with `--tail-mass`, the other classes keep their "
             "mass, spread evenly). Score: "
             f"linear-probe accuracy on frozen features, mean of {'/'.join(map(str, shots))}-shot, per downstream "
             f"task and their mean (the benchmark's transfer score). Mean ± std over seeds {seeds}; 'diff' is "
             "the mean ± std of each seed's paired difference to online.", "",
             "| variant | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
    lines.append("| online | " + " | ".join(mean_std([online[s][1][t] for s in seeds]) for t in tasks)
                 + f" | {mean_std(online_means)} |")
    names = [name(k, tail) for k, tail in variants]
    for v in names:
        lines.append(f"| {v} | " + " | ".join(mean_std([cached[s][v][1][t] for s in seeds]) for t in tasks)
                     + f" | {mean_std([cached[s][v][0] for s in seeds])} |")
    for v in names:
        diffs = {t: [cached[s][v][1][t] - online[s][1][t] for s in seeds] for t in tasks}
        lines.append(f"| {v} diff | " + " | ".join(mean_std(diffs[t]) for t in tasks)
                     + f" | {mean_std([cached[s][v][0] - online[s][0] for s in seeds])} |")
    spread = statistics.stdev(online_means) if len(seeds) > 1 else 0.0
    lines += ["", f"Seed spread of online RepCon's mean score: {spread:.3f} (std over seeds). For reference, "
              f"RepCon - generalist teacher (online): {mean_std([online[s][0] - generalist[s] for s in seeds])}.", ""]
    for v in names:
        diffs = [cached[s][v][0] - online[s][0] for s in seeds]
        verdict = "within" if abs(statistics.mean(diffs)) <= spread else "outside"
        lines.append(f"- {v} ({cache_bytes[v]} bytes per image and epoch): mean paired difference "
                     f"{statistics.mean(diffs):+.3f}, {verdict} the seed spread ({spread:.3f}).")
    teachers = list(mass[seeds[0]])
    lines += ["", "What a top-k cache keeps of each teacher's target: the share of its softened distribution (at the "
              "run's temperature) in its k largest entries, mean over the first 512 proxy images, mean ± std over "
              "seeds (a plain top-k cache's loss renormalises these k entries and gives every other class 0; a "
              "tail-mass cache keeps this share for the k and the rest for the other classes):", "",
              "| k | " + " | ".join(teachers) + " |", "|---|" + "---:|" * len(teachers)]
    for k in args.ks:
        lines.append(f"| {k} | " + " | ".join(mean_std([mass[s][t][k] for s in seeds]) for t in teachers) + " |")
    lines += ["", f"Total {time.perf_counter() - started:.0f} s (the benchmark's seeds finished earlier are reused).", ""]
    text = "\n".join(lines)
    print(text)
    if args.size != "quick":
        (REPO / "bench" / "results" / "cache_accuracy_glyphs.md").write_text(text, encoding="utf-8")
    (out / "cache_accuracy" / "results.json").write_text(json.dumps(
        {"online": online, "cached": cached, "top_k_mass": mass}, indent=1))


if __name__ == "__main__":
    main()
