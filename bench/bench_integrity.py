"""What the run's integrity checks cost: content hashes on checkpoints, the finite flag per step.

    python bench/bench_integrity.py [--backbone resnet18] [--heads 1000] [--repeats 3]

Prints one table:

- a checkpoint of the student (weights + AdamW state), written with
  ``torch.save`` alone and with rcfast's content hash (``save_checkpoint_file``),
  and loaded with ``torch.load`` alone and verified (``load_checkpoint``); the
  hash alone in MB/s;
- a training step with and without the divergence flag (``_note_loss``:
  ``isfinite`` + ``where`` on the device, no host sync), and the check run
  before every write (``check_finite``: every weight and optimiser tensor).

Median of ``--repeats`` runs; figures depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # TensorProxy, toy_images

from helpers.proxy import TensorProxy, toy_images  # noqa: E402
from rcfast.models import build_classifier, build_student  # noqa: E402
from rcfast.train import Consolidator, OptimConfig, TrainConfig  # noqa: E402
from rcfast.train.checkpoint import atomic_save, content_digest, load_checkpoint, save_checkpoint_file  # noqa: E402


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def checkpoint_rows(backbone: str, heads: int, repeats: int) -> list[tuple[str, str]]:
    torch.manual_seed(0)
    student = build_student(backbone, {"a": heads})
    optimizer = torch.optim.AdamW(student.parameters())
    student(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    state = {"format": "rcfast.consolidator/2", "model": student.state_dict(), "optimizer": optimizer.state_dict()}
    megabytes = sum(t.numel() * t.element_size() for t in student.state_dict().values()) * 3 / 2**20
    with tempfile.TemporaryDirectory() as folder:
        plain, hashed = Path(folder) / "plain.pt", Path(folder) / "hashed.pt"
        save_plain = _median_seconds(lambda: atomic_save(state, plain), repeats)
        save_hashed = _median_seconds(lambda: save_checkpoint_file(state, hashed), repeats)
        load_plain = _median_seconds(lambda: torch.load(hashed, weights_only=True), repeats)
        load_verified = _median_seconds(lambda: load_checkpoint(hashed), repeats)
    digest = _median_seconds(lambda: content_digest(state), repeats)
    return [(f"checkpoint ({backbone}, {megabytes:.0f} MB)", ""),
            ("  save: torch.save / with content hash", f"{save_plain:.3f} s / {save_hashed:.3f} s"),
            ("  load: torch.load / verified", f"{load_plain:.3f} s / {load_verified:.3f} s"),
            ("  content hash alone", f"{digest:.3f} s ({megabytes / digest:.0f} MB/s)")]


def step_rows(repeats: int, steps: int = 20) -> list[tuple[str, str]]:
    images, _ = toy_images(64, 6, image_size=32, seed=1)
    torch.manual_seed(0)
    teacher = build_classifier("small_cnn", 6, width=8)
    with tempfile.TemporaryDirectory() as folder:
        trainer = Consolidator(build_student("small_cnn", {"t": 6}, width=8), [{"term": "multihead_kd"}],
                               TensorProxy(images, batch_size=32), teachers={"t": teacher},
                               train=TrainConfig(max_steps=10**6, out_dir=folder, progress=False),
                               optim=OptimConfig(lr=1e-3))
        trainer.train_step()
        original = trainer._note_loss

        def run(note) -> float:
            trainer._note_loss = note
            return _median_seconds(lambda: [trainer.train_step() for _ in range(steps)], repeats) / steps

        with_flag = run(original)
        without = run(lambda loss: None)
        trainer._note_loss = original
        check = _median_seconds(lambda: trainer.check_finite("a benchmark"), repeats)
    return [("training step (small_cnn width 8, batch 32, 32x32, CPU)", ""),
            ("  without / with the finite flag", f"{without * 1e3:.2f} ms / {with_flag * 1e3:.2f} ms"),
            ("  check before a write (all weights + optimiser state)", f"{check * 1e3:.2f} ms")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--heads", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = checkpoint_rows(args.backbone, args.heads, args.repeats) + step_rows(args.repeats)
    width = max(len(name) for name, _ in rows)
    print(f"rcfast integrity costs (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
