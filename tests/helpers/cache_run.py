"""A tiny run for the teacher-cache tests: images, teacher checkpoints, a config; and a script to run it.

In-process: ``make_run(root)`` writes ``root/images`` (37 small PNGs of
varied sizes), two seeded random teachers (5 and 40 classes, so a top-8 cache
is really top-k for one of them and whole for the other) and returns the run's
config as a dict; ``write_config(root, data)`` stores one as YAML.

As a script (what the SIGKILL and DDP tests start):

- ``python cache_run.py train --config run.yaml [--set k=v ...] [--hang-after N]``
  trains from the config (``Consolidator.from_config``, as ``rcfast
  consolidate``); with ``--hang-after N`` it writes ``<out_dir>/hung`` after
  step N and sleeps, so a test can SIGKILL it there;
- ``python cache_run.py build --config run.yaml --out DIR [--top-k K]
  [--chunk-batches N] [--hang-in-chunk N]`` builds the cache; with
  ``--hang-in-chunk N`` the N-th chunk file is left half written (its
  temporary file flushed) and ``DIR/hung`` written before it sleeps.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests/ folder, for `helpers`

from helpers.images import smooth_rgb  # noqa: E402
from rcfast.models import build_classifier  # noqa: E402

TEACHERS = {"small": 5, "wide": 40}
NUM_IMAGES = 37


def make_run(root: Path, steps: int = 10, batch_size: int = 8) -> dict:
    """Images, teacher checkpoints and a run config (a dict) under ``root``."""
    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(NUM_IMAGES):
        Image.fromarray(smooth_rgb(20 + i % 7, 18 + i % 5, seed=i)).save(images / f"{i:03d}.png")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    teachers = []
    for name, classes in TEACHERS.items():
        model = build_classifier("small_cnn", classes, width=4)
        with torch.no_grad():  # sharper than at initialisation: a teacher with something to say
            model.heads.weight.mul_(20.0)
        torch.save(model.state_dict(), root / f"{name}.pt")
        teachers.append({"name": name, "builder": "small_cnn", "builder_kwargs": {"width": 4},
                         "checkpoint": str(root / f"{name}.pt"), "num_classes": classes})
    torch.random.set_rng_state(generator_state)
    return {
        "student": {"backbone": "small_cnn", "backbone_kwargs": {"width": 4}},
        "teachers": teachers,
        "data": {"source": str(images), "image_size": 16, "batch_size": batch_size, "augment": "rrc_flip",
                 "backend": "pil", "num_threads": 0, "drop_last": True},
        "objective": [{"term": "multihead_kd", "temperature": {"small": 2.0, "wide": 4.0},
                       "head_weights": {"small": 1.0, "wide": 0.5}}],
        "optim": {"lr": 0.01, "warmup_steps": 2},
        "train": {"max_steps": steps, "seed": 3, "deterministic": False, "num_threads": None, "log_every": 1,
                  "progress": False, "out_dir": str(root / "run"), "resume": "none", "checkpoint_every": 0,
                  "keep_checkpoints": 10},
    }


def write_config(path: Path, data: dict) -> Path:
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
    return Path(path)


def _train(args) -> None:
    from rcfast.train import Consolidator, load_config
    from rcfast.train.runtime import apply_runtime

    config = load_config(args.config, args.set)
    apply_runtime(config.train)
    trainer = Consolidator.from_config(config)
    if args.hang_after is not None:
        def hang(t) -> None:
            if t.step == args.hang_after and t.ctx.is_main:
                (Path(config.train.out_dir) / "hung").write_text(str(t.step))
                time.sleep(600)
        trainer.add_callback(hang)
    print("SUMMARY", trainer.fit(), flush=True)
    trainer.close()


def _build(args) -> None:
    from rcfast.train import load_config
    from rcfast.train.runtime import apply_runtime
    from rcfast.train.teacher_cache import build as build_module, store

    config = load_config(args.config, args.set)
    apply_runtime(config.train)
    if args.hang_in_chunk is not None:
        written = []
        real_atomic_write = store.atomic_write

        def half_then_hang(path, blocks):
            if path.suffix == ".bin":
                written.append(path)
                if len(written) == args.hang_in_chunk:
                    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                    with open(tmp, "wb") as f:
                        data = b"".join(blocks)
                        f.write(data[:len(data) // 2])
                        f.flush()
                    (Path(args.out) / "hung").write_text(str(path))
                    time.sleep(600)
            real_atomic_write(path, blocks)

        store.atomic_write = half_then_hang  # what store.write_chunk calls
    summary = build_module.build_teacher_cache(config, args.out, top_k=args.top_k, epochs=args.epochs,
                                               chunk_batches=args.chunk_batches, progress=False)
    print("SUMMARY", summary, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--hang-after", type=int, default=None)
    p = sub.add_parser("build")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--chunk-batches", type=int, default=None)
    p.add_argument("--hang-in-chunk", type=int, default=None)
    args = parser.parse_args()
    {"train": _train, "build": _build}[args.command](args)


if __name__ == "__main__":
    main()
