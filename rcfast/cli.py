"""The ``rcfast`` command: ``consolidate``, ``eval``, ``bench`` and ``demo``.

- ``rcfast consolidate --config run.yaml [--set key=value ...]``: train from a
  YAML config (see :class:`rcfast.train.RunConfig`); under ``torchrun`` it runs DDP.
- ``rcfast eval --checkpoint final.pt --data TASK_DIR``: linear probe and kNN
  (and optionally a fine-tune) of a trained backbone on a labeled task folder
  with ``train/`` and ``test/`` class folders.
- ``rcfast bench [args]``: the loss benchmark ``bench/bench_kd_loss.py`` of a
  source checkout, in script mode.
- ``rcfast demo [--out DIR] [--quick]``: the end-to-end digits demo.

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
}

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_SCRIPT = REPO_ROOT / "bench" / "bench_kd_loss.py"


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

    p = sub.add_parser("demo", help="end-to-end representation-consolidation demo on digits")
    p.add_argument("--out", default="rcfast-demo", help="output folder (default: ./rcfast-demo)")
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test in well under a minute")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
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
        Path(args.json).write_text(json.dumps(result, indent=1))
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
    results = run_demo(args.out, quick=args.quick)
    out = Path(args.out).resolve()
    print()
    print(results["table"])
    print(f"\nDemo finished in {results['total_seconds']:.0f} s. Report: {out / 'report.md'}, "
          f"chart: {out / 'transfer.png'}, results: {out / 'results.json'}")
    return 0


COMMANDS = {"consolidate": _consolidate, "eval": _eval, "bench": _bench, "demo": _demo}


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> str:
    return f"rcfast: warning: {' '.join(str(message).split())}\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rcfast`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    # This process is the command's own: its warnings print as one line each, like its errors.
    warnings.formatwarning = _one_line_warnings
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
