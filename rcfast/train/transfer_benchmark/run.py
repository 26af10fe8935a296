"""``run_transfer_benchmark``: the whole protocol over several seeds, resumable, into one output folder.

Order of work: every input is checked first (settings, optional packages,
scripts and class counts for every seed, the output folder), so a bad input
fails in the first seconds with one clear error; then per seed: render the
data (cached on disk), train the runs, score the backbones, and write
``seeds/<seed>/results.json``; finally the claims, ``results.json``,
``report.md`` and ``transfer.png``.

The output folder belongs to one benchmark: ``benchmark.json`` holds its
format, version and every setting. Called again with the same settings (the
number of seeds aside), the benchmark continues -- finished seeds and runs are
kept, an interrupted run resumes from its last checkpoint, more seeds are
added to the finished ones; with other settings it is refused unless
``overwrite=True``, which deletes what the benchmark wrote (the rendered data
is kept where its parameters still match) and starts again. A non-empty
folder without ``benchmark.json`` is never touched.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from rcfast.data.glyphs.protocol import choose_classes, protocol_data, script_slug
from rcfast.extras import require
from rcfast.atomic import atomic_write_json as _write_json
from rcfast.train.experiment import cpu_seconds, train_runs
from rcfast.train.transfer_benchmark.claims import aggregate, evaluate_claims, learning_check, mean_std
from rcfast.train.transfer_benchmark.evaluate import evaluate_seed
from rcfast.train.transfer_benchmark.report import CHART, write_chart, write_report
from rcfast.train.transfer_benchmark.runs import model_labels, recipe_for, seed_configs
from rcfast.train.transfer_benchmark.settings import FORMAT, VERSION, BenchmarkSettings

__all__ = ["run_transfer_benchmark", "prepare_output", "SPEC_FILE"]

SPEC_FILE = "benchmark.json"
RESULTS, REPORT = "results.json", "report.md"
_WRITTEN = ("seeds", RESULTS, REPORT, CHART)  # what --overwrite deletes (then SPEC_FILE, last)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _flat(data, prefix: str = "") -> dict:
    if not isinstance(data, dict):
        return {prefix: data}
    out = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _differences(old, new) -> str:
    old, new = _flat(old), _flat(new)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:8]) + (
        f" (+{len(changed) - 8} more)" if len(changed) > 8 else "")


def _without_seeds(spec) -> dict | None:
    if not isinstance(spec, dict) or not isinstance(spec.get("settings"), dict):
        return None
    return {**spec, "settings": {k: v for k, v in spec["settings"].items() if k != "seeds"}}


def prepare_output(out_dir, spec: dict, overwrite: bool) -> Path:
    """Claim ``out_dir`` for the benchmark ``spec`` (see the module docstring); return it resolved."""
    out = Path(out_dir).expanduser().resolve()
    spec_path = out / SPEC_FILE
    if spec_path.exists():
        stored = _read_json(spec_path)
        if not isinstance(stored, dict) or stored.get("format") != FORMAT:
            raise ValueError(f"--out {out}: its {SPEC_FILE} is not a transfer benchmark's; choose another folder")
        if stored == spec:
            return out
        if _without_seeds(stored) == _without_seeds(spec):
            # Only the number of seeds differs: seeds are independent replicates, so the
            # finished ones are kept and the benchmark continues with the new count.
            _write_json(spec_path, spec)
            return out
        if not overwrite:
            raise ValueError(f"--out {out} already holds a transfer benchmark with other parameters "
                             f"({_differences(stored, spec)}); pass --overwrite to rebuild it, or choose "
                             "another folder")
        for name in _WRITTEN:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        spec_path.unlink()  # last: until here the folder still reads as the old benchmark
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} is not empty and holds no transfer benchmark; the benchmark writes only "
                         "into a new or empty folder (or one of its own)")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(spec_path, spec)
    return out


def _run_seed(seed: int, settings: BenchmarkSettings, out: Path, data_root: Path, overwrite_data: bool,
              log: Callable[[str], None]) -> dict:
    wall, cpu = time.perf_counter(), cpu_seconds()
    seed_dir = out / "seeds" / str(seed)
    log(f"[benchmark] seed {seed}: data under {data_root / f'seed_{seed}'}")
    data = protocol_data(data_root / f"seed_{seed}", settings.protocol, seed, overwrite=overwrite_data,
                         progress=True)
    rendered = cpu_seconds()
    configs = seed_configs(data, settings, seed, seed_dir / "runs")
    summaries = train_runs(configs, seed_dir / "configs", fresh=False, log=log, label=f"benchmark seed {seed}")
    trained = cpu_seconds()
    evaluation = evaluate_seed(data, summaries, settings, recipe_for(settings, seed), seed, log)
    return {
        "seed": seed,
        "classes": dataclasses.asdict(data.classes),
        **evaluation,
        "training": {name: {"steps": s["steps"], "final_loss": s["loss"], "images_per_sec": s["images_per_sec"],
                            "wall_time_s": s["wall_time_s"], "cpu_time_s": s.get("cpu_time_s")}
                     for name, s in summaries.items()},
        # CPU of this process; rendering runs in worker processes (only its share here is counted).
        "timing": {"wall_s": time.perf_counter() - wall, "cpu_s": cpu_seconds() - cpu,
                   "cpu_s_data": rendered - cpu, "cpu_s_training": trained - rendered,
                   "cpu_s_evaluation": cpu_seconds() - trained},
    }


def _stat(values) -> dict:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "values": [float(v) for v in values]}


def _results(settings: BenchmarkSettings, seed_results: list[dict], command: str, timing: dict) -> dict:
    protocol = settings.protocol
    specialists = list(protocol.specialist_scripts)
    slugs = [script_slug(s) for s in specialists]
    downstream = list(seed_results[0]["transfer"]["random_init"])
    futures = [f"future_{slug}" for slug in slugs]
    claims = evaluate_claims(seed_results, downstream=downstream, specialist_tasks=slugs,
                             specialist_futures=futures, specialist_scripts=specialists, shots=settings.shots,
                             oracle_margin=settings.oracle_margin, student_init=settings.student_init)
    labels = model_labels(specialists, settings.student_init)
    runs = list(seed_results[0]["training"])
    return {
        "format": FORMAT, "version": VERSION, "command": command,
        "seeds": [r["seed"] for r in seed_results],
        "claims": claims,
        "learning_check": learning_check(seed_results, downstream=downstream, shots=settings.shots),
        "settings": settings.as_dict(),
        "models": labels,
        "downstream_tasks": downstream,
        "aggregate": aggregate(seed_results, settings.shots),
        "teacher_accuracy": {name: _stat([r["teacher_accuracy"][name] for r in seed_results])
                             for name in seed_results[0]["teacher_accuracy"]},
        "training": {name: {"steps": seed_results[0]["training"][name]["steps"],
                            "final_loss": _stat([r["training"][name]["final_loss"] for r in seed_results]),
                            "images_per_sec": _stat([r["training"][name]["images_per_sec"] for r in seed_results]),
                            "cpu_time_s": _stat([r["training"][name]["cpu_time_s"] for r in seed_results])}
                     for name in runs},
        "timing": timing,
        "software": {"torch": torch.__version__, "python": platform.python_version(),
                     "machine": platform.machine(), "cpus": os.cpu_count()},
        "per_seed": seed_results,
    }


def run_transfer_benchmark(out_dir="rcfast-benchmark", settings: BenchmarkSettings | None = None, *,
                           quick: bool = False, overwrite: bool = False, data_dir=None, command: str = "",
                           log: Callable[[str], None] = print) -> dict:
    """Run (or continue) the transfer benchmark into ``out_dir``; return the results (also ``results.json``).

    Args:
        settings: default :class:`BenchmarkSettings` (``BenchmarkSettings.quick()`` with ``quick``).
        overwrite: rebuild a folder that holds a benchmark with other settings.
        data_dir: where the rendered data go (default ``<out_dir>/data``); reusable across output folders.
        command: the command line to print in the report.
    """
    if settings is None:
        settings = BenchmarkSettings.quick() if quick else BenchmarkSettings()
    if not isinstance(settings, BenchmarkSettings):
        raise TypeError(f"settings must be a BenchmarkSettings, got {type(settings).__name__}")
    settings.validate()
    require("rcfast benchmark transfer", "numpy", "yaml", "tqdm", "sklearn", "matplotlib", "PIL")
    # Scripts resolved to the catalogue's names (an unknown one is an error listing all of them),
    # and every seed's class split made once, so too few classes fail here, before any work.
    settings = dataclasses.replace(settings, protocol=settings.protocol.resolve())
    for seed in settings.seed_list:
        choose_classes(settings.protocol, seed)
    out = prepare_output(out_dir, settings.spec(), overwrite)
    data_root = Path(data_dir).expanduser().resolve() if data_dir is not None else out / "data"
    command = command or f"run_transfer_benchmark({str(out_dir)!r}, quick={quick})"

    wall, cpu = time.perf_counter(), cpu_seconds()
    seed_results = []
    for seed in settings.seed_list:
        path = out / "seeds" / str(seed) / RESULTS
        stored = _read_json(path)
        if isinstance(stored, dict) and stored.get("seed") == seed:
            log(f"[benchmark] seed {seed}: finished earlier, kept ({path})")
        else:
            stored = _run_seed(seed, settings, out, data_root, overwrite, log)
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_json(path, stored)
        seed_results.append(stored)
    timing = {"wall_s": time.perf_counter() - wall, "cpu_s": cpu_seconds() - cpu,
              "threads": torch.get_num_threads(),
              "load_average": ", ".join(f"{x:.1f}" for x in os.getloadavg())}
    results = _results(settings, seed_results, command, timing)
    _write_json(out / RESULTS, results)
    write_chart(results, out / CHART)
    write_report(results, out / REPORT)
    return results
