"""The ``rcfast`` command and its subcommands.

- ``rcfast consolidate --config run.yaml [--set key=value ...]``: train from a
  YAML config (see :class:`rcfast.train.RunConfig`); under ``torchrun`` it runs DDP.
- ``rcfast eval --checkpoint final.pt --data TASK_DIR``: linear probe and kNN
  (and optionally a fine-tune) of a trained backbone on a labeled task folder
  with ``train/`` and ``test/`` class folders.
- ``rcfast bench [args]``: the loss benchmark ``bench/bench_kd_loss.py`` of a
  source checkout, in script mode.
- ``rcfast rank-teachers --repo DIR --target DIR [--json out.json]``: rank a
  folder of teacher checkpoints by relatedness to a labeled target folder
  (optimal transport; see :mod:`rcfast.select`).
- ``rcfast demo [--out DIR] [--quick]``: the end-to-end digits demo;
  ``--method iekd|dmc [--seeds N] [--data digits|glyphs]``: the IE-KD or DMC
  comparison instead.
- ``rcfast benchmark transfer [--seeds N] [--quick] [--out DIR] [--overwrite]``:
  the representation-consolidation paper's protocol on glyph images, several
  seeds, its claims tested (docs/benchmark.md).
- ``rcfast cache-teachers --config run.yaml [--epochs E] [--top-k K [--no-tail-mass]] [--out DIR]``:
  run the config's teachers once over the images its run will see and store
  their (top-k) logits; a run with ``teacher_cache: DIR`` reads them instead
  (docs/teacher_cache.md).

Configuration and input errors -- and a run that diverges, loses a DDP peer,
or meets an unusable checkpoint -- print one ``rcfast: error: ...`` line and
exit with status 2 (``RCFAST_DEBUG=1`` shows the traceback instead). Each
command first checks that the optional packages it needs are installed
(:data:`COMMAND_NEEDS`), so a missing extra is reported in the first second,
naming the ``pip install 'rcfast[...]'`` that brings it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

from rcfast.extras import require

__all__ = ["main", "build_parser", "COMMAND_NEEDS"]

# Optional modules each command needs (rcfast.extras maps them to extras), checked before it does anything.
_DATA = ("numpy", "PIL", "simplejpeg")  # rcfast.data: images are checked with simplejpeg when listed
COMMAND_NEEDS = {
    "consolidate": ("yaml", "tqdm") + _DATA,
    "eval": ("yaml", "tqdm", "sklearn", "threadpoolctl") + _DATA,
    "demo": ("yaml", "tqdm", "sklearn", "threadpoolctl", "matplotlib") + _DATA,
    "bench": (),
    "benchmark": ("yaml", "tqdm", "sklearn", "threadpoolctl", "matplotlib", "fontTools") + _DATA,
    "rank-teachers": ("yaml", "sklearn", "threadpoolctl") + _DATA,
    "cache-teachers": ("yaml", "tqdm") + _DATA,
}

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_SCRIPT = REPO_ROOT / "bench" / "bench_kd_loss.py"


DEMO_METHODS = ("repcon", "iekd", "dmc")


class CliError(Exception):
    """An error in the command's inputs, reported without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rcfast", description="Fast representation-consolidation distillation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("consolidate", help="train a student (or teacher/oracle) from a YAML config")
    p.add_argument("--config", required=True, help="YAML run config (mirrors rcfast.train.RunConfig)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. train.max_steps=100 or teachers.0.weight=2")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume a run under a config that differs in more than run-length/logging fields "
                        "(train.allow_config_change: true); the change is recorded")

    p = sub.add_parser("eval", help="transfer evaluation of a trained backbone on a labeled task")
    p.add_argument("--checkpoint", required=True, help="final.pt or a trainer checkpoint")
    p.add_argument("--data", required=True, help="task folder with train/ and test/ class folders")
    p.add_argument("--backbone", default=None, help="backbone name (default: from the checkpoint's config)")
    p.add_argument("--backbone-kwargs", default=None, help="JSON kwargs of --backbone")
    p.add_argument("--image-size", type=int, default=None, help="default: the checkpoint config's data.image_size")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--knn-k", type=int, nargs="+", default=[10])
    p.add_argument("--finetune-epochs", type=int, default=0)
    p.add_argument("--data-backend", default="auto", choices=("auto", "dali", "pil"))
    p.add_argument("--augment", default="none", choices=("none", "center"))
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")

    p = sub.add_parser("bench", help="run bench/bench_kd_loss.py (needs the source checkout)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark script")

    p = sub.add_parser("demo", help="end-to-end demo on digits: representation consolidation, IE-KD or DMC")
    p.add_argument("--method", default="repcon", choices=DEMO_METHODS,
                   help="repcon (default): consolidation and transfer; iekd: inheritance and exploration KD vs KD "
                        "and mutual learning; dmc: class-incremental deep model consolidation")
    p.add_argument("--out", default=None, help="output folder (default: ./rcfast-demo, or ./rcfast-demo-<method>)")
    p.add_argument("--seeds", type=int, default=None, help="iekd/dmc: number of seeds (default 3; --quick: 2)")
    p.add_argument("--data", default=None, choices=("digits", "glyphs"),
                   help="iekd/dmc: ten classes of scikit-learn's digits (default) or of rcfast.data.glyphs")
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test in well under a minute")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")

    p = sub.add_parser("benchmark", help="evidence benchmarks on rendered glyph data")
    kinds = p.add_subparsers(dest="benchmark", required=True)
    p = kinds.add_parser("transfer", help="the paper's transfer protocol on glyphs: teachers, students, "
                                          "few-shot probes, claims (docs/benchmark.md)")
    p.add_argument("--seeds", type=int, default=None, help="replicates, seeds 0..N-1 (default 3; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke-test size (about a minute of CPU); same as "
                                                        "--size quick")
    p.add_argument("--size", choices=("quick", "medium", "full"), default=None,
                   help="preset: quick (smoke test), medium (about 4 CPU-minutes a seed), full (default)")
    p.add_argument("--out", default="rcfast-benchmark", help="output folder (default: ./rcfast-benchmark)")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild an output folder that holds a benchmark with other parameters")
    p.add_argument("--data-dir", default=None, help="rendered glyph data (default: OUT/data); shareable")
    p.add_argument("--student-init", choices=("generalist", "random"), default=None,
                   help="students' and oracle's starting weights (default: generalist, as in the paper)")
    p.add_argument("--general-scripts", default=None, help="comma-separated scripts of the general domain "
                                                           "(default: Latin,Greek,Cyrillic)")
    p.add_argument("--specialist-scripts", default=None, help="comma-separated specialist scripts, at least 2 "
                                                              "(default: Georgian,Arabic)")
    p.add_argument("--unused-script", default=None, help="the script no model sees (default: Canadian Aboriginal)")
    p.add_argument("--general-classes", type=int, default=None, help="generalist's classes (default 300)")
    p.add_argument("--specialist-classes", type=int, default=None, help="classes per specialist (default 70)")
    p.add_argument("--future-classes", type=int, default=None,
                   help="held-out classes per specialist script (default 45)")
    # The runs are tiny CNNs: a second intra-op thread gains little and, on a busy
    # machine, its spin-waiting cost ten times the CPU per step in our measurements.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")

    p = sub.add_parser("rank-teachers", help="rank a folder of teachers by relatedness to a labeled target task")
    p.add_argument("--repo", required=True, help="folder of teacher checkpoints, each with a <name>.yaml "
                   "(builder, num_classes, builder_kwargs; see rcfast.select.repository)")
    p.add_argument("--target", required=True, help="labeled target sample: one sub-folder of images per class")
    p.add_argument("--method", default="ot", choices=("ot", "leep", "linear_probe"))
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="of the teachers' softmax (ot)")
    p.add_argument("--eps", type=float, default=0.05, help="entropic regularisation (ot; the costs are in [0, 1])")
    p.add_argument("--metric", default="cosine", choices=("cosine", "euclidean"), help="of the cost matrix")
    p.add_argument("--data-backend", default="auto", choices=("auto", "dali", "pil"))
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the ranking to this JSON file")
    p.add_argument("--save-costs", default=None, metavar="DIR",
                   help="write each ranked teacher's cost matrix to DIR/<name>.cost.pt (the ot_distill term's cost)")

    p = sub.add_parser("cache-teachers", help="run a config's teachers once and store their top-k logits for its run")
    p.add_argument("--config", required=True, help="the YAML run config whose teachers and data are cached")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, as for consolidate")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs to cover (default: what train.max_steps needs)")
    p.add_argument("--top-k", type=int, default=None, help="logits kept per sample and teacher (default: all)")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"),
                   help="storage of the logits (default: fp32 when all are kept, else fp16)")
    p.add_argument("--tail-mass", action=argparse.BooleanOptionalAction, default=None,
                   help="(top-k; on by default) also keep each teacher's mass outside its top k at the run's "
                        "temperature, spread evenly over those classes (one more value per teacher); "
                        "--no-tail-mass: the k alone, renormalised by the loss")
    p.add_argument("--num-shards", type=int, default=None,
                   help="ranks of the runs that read it bitwise (default: the torchrun world size, else 1)")
    p.add_argument("--out", default=None,
                   help="cache folder (default: the config's teacher_cache, else <train.out_dir>/teacher_cache)")
    return parser


def _consolidate(args) -> int:
    from rcfast.train import Consolidator, dump_config, load_config
    from rcfast.train.runtime import apply_runtime

    overrides = list(args.overrides) + (["train.allow_config_change=true"] if args.allow_config_change else [])
    config = load_config(args.config, overrides)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    # This command owns the process: threads, determinism and seeds are set here,
    # before any model touches a device (cuBLAS reads its workspace setting once).
    apply_runtime(config.train)
    trainer = Consolidator.from_config(config)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    if trainer.ctx.is_main:
        print(json.dumps(summary, indent=1))
    return 0


def _eval(args) -> int:
    from rcfast.data import ProxyImages
    from rcfast.eval import evaluate_transfer
    from rcfast.train.distributed import resolve_device
    from rcfast.train.trained_model import load_trained_backbone

    for option, value, low in (("--batch-size", args.batch_size, 1), ("--finetune-epochs", args.finetune_epochs, 0),
                               ("--image-size", args.image_size if args.image_size is not None else 1, 1)):
        if value < low:
            raise CliError(f"{option} must be >= {low}, got {value}")
    if any(k < 1 for k in args.knn_k):
        raise CliError(f"--knn-k values must be >= 1, got {args.knn_k}")
    kwargs = None
    if args.backbone_kwargs is not None:
        if args.backbone is None:
            raise CliError("--backbone-kwargs needs --backbone")
        try:
            kwargs = json.loads(args.backbone_kwargs)
        except json.JSONDecodeError as exc:
            raise CliError(f"--backbone-kwargs is not valid JSON: {exc}") from exc
        if not isinstance(kwargs, dict):
            raise CliError(f"--backbone-kwargs must be a JSON object, got {args.backbone_kwargs}")
    data = Path(args.data)
    for split in ("train", "test"):
        if not (data / split).is_dir():
            raise FileNotFoundError(f"--data: {data / split} does not exist (expected train/ and test/ class folders)")
    trained = load_trained_backbone(args.checkpoint, args.backbone, kwargs, args.image_size)
    if trained.image_size is None:
        raise CliError("--image-size is needed: the checkpoint holds no run config")
    device = resolve_device(args.device)
    backbone = trained.backbone.to(device)

    def labeled(split: str) -> ProxyImages:
        return ProxyImages(str(data / split), image_size=trained.image_size, batch_size=args.batch_size,
                           device=str(device), augment=args.augment, labels=True, drop_last=False, shuffle=False,
                           backend=args.data_backend)

    train, test = labeled("train"), labeled("test")
    result = evaluate_transfer(backbone, train, test, knn_k=args.knn_k, finetune_epochs=args.finetune_epochs,
                               num_classes=train.num_classes, device=device)
    print(json.dumps(result, indent=1))
    if args.json:
        from rcfast.atomic import atomic_write_json
        atomic_write_json(Path(args.json), result)
    return 0


def _bench(args) -> int:
    if not BENCH_SCRIPT.is_file():
        raise CliError(f"rcfast bench runs the benchmark script of a source checkout, but {BENCH_SCRIPT} does not "
                       "exist (rcfast installed without its repository?). Clone the repository and run it there.")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    extra = [a for a in args.bench_args if a != "--"]
    # The script prints its own table; its output goes straight to ours.
    return subprocess.run([sys.executable, str(BENCH_SCRIPT), *extra], cwd=REPO_ROOT, env=env).returncode


def _demo(args) -> int:
    from rcfast.train.demo import run_demo
    from rcfast.train.runtime import RuntimeSettings, apply_runtime

    if args.threads is not None:
        if args.threads <= 0:
            raise CliError(f"--threads must be > 0, got {args.threads}")
        apply_runtime(RuntimeSettings(num_threads=args.threads))
    if args.seeds is not None and (args.seeds <= 0 or args.method == "repcon"):
        raise CliError(f"--seeds must be > 0 and is for --method iekd or dmc, got {args.seeds} with {args.method}")
    if args.data is not None and args.method == "repcon":
        raise CliError("--data is for --method iekd or dmc (the repcon demo runs on digits)")
    if args.method != "repcon":
        return _method_demo(args)
    out = Path(args.out or "rcfast-demo").resolve()
    results = run_demo(out, quick=args.quick)
    print()
    print(results["table"])
    print(f"\nDemo finished in {results['total_seconds']:.0f} s. Report: {out / 'report.md'}, "
          f"chart: {out / 'transfer.png'}, results: {out / 'results.json'}")
    return 0


def _scripts(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


_BENCHMARK_FLAGS = ("seeds", "quick", "size", "out", "overwrite", "data_dir", "student_init", "general_scripts",
                    "specialist_scripts", "unused_script", "general_classes", "specialist_classes", "future_classes",
                    "threads")


def _benchmark_command(args) -> str:
    """The command line that reproduces this benchmark (for its report)."""
    import shlex

    parts = ["rcfast", "benchmark", "transfer"]
    for dest in _BENCHMARK_FLAGS:
        value = getattr(args, dest)
        if value not in (None, False):
            parts.append(f"--{dest.replace('_', '-')}")
            if value is not True:
                parts.append(shlex.quote(str(value)))
    return " ".join(parts)


def _benchmark(args) -> int:
    import dataclasses

    from rcfast.train.runtime import RuntimeSettings, apply_runtime
    from rcfast.train.transfer_benchmark import BenchmarkSettings, run_transfer_benchmark

    for flag in ("seeds", "general_classes", "specialist_classes", "future_classes", "threads"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise CliError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.quick and args.size not in (None, "quick"):
        raise CliError(f"--quick and --size {args.size} contradict each other; give one of them")
    settings = BenchmarkSettings.preset("quick" if args.quick else args.size or "full")
    protocol_changes = {key: value for key, value in (
        ("general_scripts", args.general_scripts and _scripts(args.general_scripts)),
        ("specialist_scripts", args.specialist_scripts and _scripts(args.specialist_scripts)),
        ("unused_script", args.unused_script), ("general_classes", args.general_classes),
        ("specialist_classes", args.specialist_classes), ("specialist_future_classes", args.future_classes),
    ) if value is not None}
    changes = {"protocol": dataclasses.replace(settings.protocol, **protocol_changes)}
    if args.seeds is not None:
        changes["seeds"] = args.seeds
    if args.student_init is not None:
        changes["student_init"] = args.student_init
    settings = dataclasses.replace(settings, **changes)
    if args.threads is not None:
        apply_runtime(RuntimeSettings(num_threads=args.threads))
    command = _benchmark_command(args)
    results = run_transfer_benchmark(args.out, settings, overwrite=args.overwrite, data_dir=args.data_dir,
                                     command=command)
    from rcfast.train.transfer_benchmark.report import score_table

    out = Path(args.out).resolve()
    print()
    print(score_table(results, markdown=False))
    print()
    for claim in results["claims"]:
        verdict = "HOLDS" if claim["holds"] else ("does not hold" if claim["decidable"] else "undecided (1 seed)")
        print(f"claim {claim['id']}: {verdict}: {claim['statement']}\n  {claim['test']}")
    check = results["learning_check"]
    print(f"check (not a claim): {'yes' if check['holds'] else 'no'}: {check['statement']}\n  {check['test']}")
    print(f"\nBenchmark finished in {results['timing']['wall_s']:.0f} s ({results['timing']['cpu_s']:.0f} s CPU). "
          f"Report: {out / 'report.md'}, chart: {out / 'transfer.png'}, results: {out / 'results.json'}")
    return 0


def _rank_teachers(args) -> int:
    import time

    from rcfast.data import ProxyImages
    from rcfast.select import final_linear, rank_teachers
    from rcfast.select.repository import Skipped, read_repository
    from rcfast.atomic import atomic_write_json
    from rcfast.train.checkpoint import atomic_save
    from rcfast.train.config import TeacherConfig
    from rcfast.train.distributed import resolve_device
    from rcfast.train.teachers import load_teacher

    specs = read_repository(args.repo)
    if not Path(args.target).is_dir():
        raise FileNotFoundError(f"--target: {args.target} is not a folder of class sub-folders")
    device = resolve_device(args.device)
    target = ProxyImages(args.target, image_size=args.image_size, batch_size=args.batch_size, device=str(device),
                         augment="none", labels=True, shuffle=False, drop_last=False, backend=args.data_backend)
    teachers, skipped, load_seconds = {}, [], {}
    for spec in specs:
        if isinstance(spec, Skipped):
            skipped.append(spec)
            continue
        start = time.perf_counter()
        config = TeacherConfig(name=spec.name, builder=spec.builder, checkpoint=str(spec.checkpoint),
                               num_classes=spec.num_classes, builder_kwargs=spec.builder_kwargs)
        try:  # a corrupt, truncated or code-carrying checkpoint skips this teacher only
            teacher = load_teacher(config, device)
            final_linear(teacher, f"teacher {spec.name!r}")
        except (ValueError, TypeError, ImportError, FileNotFoundError) as exc:
            skipped.append(Skipped(spec.name, str(exc)))
            continue
        teachers[spec.name], load_seconds[spec.name] = teacher, time.perf_counter() - start
    if not teachers:
        reasons = "; ".join(f"{s.name}: {s.reason.splitlines()[0]}" for s in skipped) or "the folder holds none"
        raise CliError(f"--repo: no usable teacher in {args.repo} ({reasons})")
    records = rank_teachers(teachers, target, method=args.method, temperature=args.temperature, eps=args.eps,
                            metric=args.metric, device=device)
    rows = [{"rank": r.rank, "name": r.name, "score": r.score, "seconds": load_seconds[r.name] + r.seconds,
             "num_classes": r.cost_matrix.shape[0]} for r in records]
    better = "lower" if args.method == "ot" else "higher"
    print(f"{args.method} scores of {len(records)} teachers for {args.target} ({target.num_classes} classes, "
          f"{better} = more related):")
    width = max(len(name) for name in [*teachers, *(s.name for s in skipped), "teacher"])
    print(f"{'rank':>4}  {'teacher':<{width}}  {'score':>10}  {'seconds':>8}")
    for row in rows:
        print(f"{row['rank']:>4}  {row['name']:<{width}}  {row['score']:>10.4f}  {row['seconds']:>8.2f}")
    for s in skipped:
        print(f"{'-':>4}  {s.name:<{width}}  skipped: {s.reason.splitlines()[0][:160]}")
    if args.save_costs:
        for r in records:
            atomic_save(r.cost_matrix, Path(args.save_costs) / f"{r.name}.cost.pt")
    if args.json:
        result = {"method": args.method, "target": str(args.target), "num_classes": target.num_classes,
                  "ranking": rows, "skipped": [{"name": s.name, "reason": s.reason} for s in skipped]}
        atomic_write_json(Path(args.json), result)  # never a half-written file
    return 0


def _method_demo(args) -> int:
    """``rcfast demo --method iekd|dmc``: the IE-KD or DMC comparison over several seeds."""
    import dataclasses

    if args.method == "iekd":
        from rcfast.train.demo_iekd import IEKDDemoSettings as Settings, run_iekd_demo as run
    else:
        from rcfast.train.demo_dmc import DMCDemoSettings as Settings, run_dmc_demo as run
    settings = Settings.quick() if args.quick else Settings()
    if args.seeds is not None:
        settings = dataclasses.replace(settings, seeds=args.seeds)
    if args.data is not None:
        settings = dataclasses.replace(settings, data=args.data)
    out = Path(args.out or f"rcfast-demo-{args.method}").resolve()
    results = run(out, settings=settings)
    print()
    print(results["table"])
    print(f"\nDemo finished in {results['total_seconds']:.0f} s. Report: {out / 'report.md'}, "
          f"results: {out / 'results.json'}")
    return 0


def _cache_teachers(args) -> int:
    from rcfast.train import load_config
    from rcfast.train.runtime import apply_runtime
    from rcfast.train.teacher_cache import build_teacher_cache

    config = load_config(args.config, args.overrides)
    out = args.out or config.teacher_cache or str(Path(config.train.out_dir) / "teacher_cache")
    # The teachers must compute what they compute in the run: the same threads/determinism settings.
    apply_runtime(config.train)
    summary = build_teacher_cache(config, out, epochs=args.epochs, top_k=args.top_k, dtype=args.dtype,
                                  num_shards=args.num_shards, tail_mass=args.tail_mass,
                                  progress=config.train.progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=1))
        print(f"train from it: rcfast consolidate --config {args.config} --set teacher_cache={out}")
    return 0


COMMANDS = {"consolidate": _consolidate, "eval": _eval, "bench": _bench, "demo": _demo}
COMMANDS["rank-teachers"] = _rank_teachers
COMMANDS["benchmark"] = _benchmark
COMMANDS["cache-teachers"] = _cache_teachers


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> str:
    return f"rcfast: warning: {' '.join(str(message).split())}\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rcfast`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    # The command's warnings print as one line each, like its errors; restored on return, so that
    # a caller running main() in its own process (a test, a notebook) gets its format back.
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warnings
    try:
        require(f"rcfast {args.command}", *COMMAND_NEEDS.get(args.command, ()))
        return COMMANDS[args.command](args)
    except Exception as exc:
        if os.environ.get("RCFAST_DEBUG") == "1" or not _reported(exc):
            raise
        # rcfast's own OSErrors carry their whole message as strerror (no "[Errno N]" in front).
        text = exc.strerror if isinstance(exc, OSError) and exc.filename is None and exc.strerror else str(exc)
        print(f"rcfast: error: {' '.join(text.split()) or type(exc).__name__}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning


def _reported(exc: BaseException) -> bool:
    """Is ``exc`` a problem of the command's inputs or run, to print as one line (not a bug: a traceback)?"""
    if isinstance(exc, (CliError, ValueError, OSError, ImportError)):  # ConfigError, CheckpointError are ValueErrors
        return True
    if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower():
        return True  # a model or batch too large for this machine
    if "rcfast.train" in sys.modules:  # TrainingError: divergence, a DDP peer lost
        from rcfast.train.errors import TrainingError
        return isinstance(exc, TrainingError)
    return False


if __name__ == "__main__":
    sys.exit(main())
