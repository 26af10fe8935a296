"""A small, deterministic distillation run, started as a subprocess by the tests.

``python tests/helpers/train_run.py --out DIR --steps 8 --checkpoint-every 3``
trains a tiny student from two seeded random teachers on in-memory images
(``TensorProxy``) or, with ``--image-dir``, on an image folder through
``rcfast.data.ProxyImages``. ``--hang-after N`` makes it write ``DIR/hung`` after
step N and then sleep, so a test can ``SIGKILL`` it at a known point. Under
``torchrun`` it runs DDP (gloo; NCCL with ``--device cuda``) with ``--batch-size`` images per rank.
``--probe-term`` adds the test term ``regression_probe`` (trainable parameters
of its own) to the objective; ``--fused-linear`` distils with ``multihead_kd``'s
``fused_linear: true`` (the student's packed head fused into the loss).
``--stop-rank R --stop-after N --stop-how
exit|hang`` makes rank R leave (``os._exit(0)``) or hang after step N, for the
DDP timeout test; ``--dist-timeout S`` sets ``train.dist_timeout_s``. As the owner of its process, the script applies
the run-wide settings itself (``apply_runtime``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests/ folder, for `helpers`

from helpers.proxy import TensorProxy, toy_images  # noqa: E402
from helpers.terms import RegressionProbe  # noqa: E402,F401  (registers regression_probe)
from rcfast.models import build_classifier, build_student  # noqa: E402
from rcfast.train import Consolidator, OptimConfig, TrainConfig, apply_runtime, setup_distributed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hang-after", type=int, default=None)
    parser.add_argument("--image-dir", default=None)
    parser.add_argument("--image-backend", default="auto")
    parser.add_argument("--norm", default="batch")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="cpu", help="cuda: the GPU tests (NCCL under torchrun)")
    parser.add_argument("--loss-backend", default="auto")
    parser.add_argument("--probe-term", action="store_true")
    parser.add_argument("--fused-linear", action="store_true")
    parser.add_argument("--stop-rank", type=int, default=None)
    parser.add_argument("--stop-after", type=int, default=2)
    parser.add_argument("--stop-how", choices=("exit", "hang"), default="hang")
    parser.add_argument("--dist-timeout", type=float, default=600.0)
    args = parser.parse_args()

    train = TrainConfig(max_steps=args.steps, checkpoint_every=args.checkpoint_every, keep_checkpoints=10,
                        out_dir=args.out, deterministic=True, num_threads=1, log_every=1, progress=False,
                        precision=args.precision, seed=7,
                        loss_backend=args.loss_backend, dist_timeout_s=args.dist_timeout)
    apply_runtime(train)
    # Join the torchrun group first: datasets take their shard from it when built.
    ctx = setup_distributed(args.device, timeout_s=args.dist_timeout)
    torch.manual_seed(1234)
    teachers = {"task": build_classifier("small_cnn", 3, width=4), "generalist": build_classifier("small_cnn", 6, width=4)}
    with torch.no_grad():  # sharpen the random teachers so the student gets a real signal
        for teacher in teachers.values():
            teacher.heads.weight.mul_(20.0)
    torch.manual_seed(0)
    student = build_student("small_cnn", {"task": 3, "generalist": 6}, width=4, norm=args.norm)
    if args.image_dir:
        from rcfast.data import ProxyImages
        data = ProxyImages(args.image_dir, image_size=16, batch_size=args.batch_size, device="cpu", seed=3,
                           augment="rrc_flip", drop_last=True, backend=args.image_backend,
                           num_threads=0 if args.image_backend == "pil" else 1)
    else:
        images, _ = toy_images(40, 6, image_size=16, seed=5)
        data = TensorProxy(images, batch_size=args.batch_size, seed=3)
    optim = OptimConfig(lr=0.01, warmup_steps=2, clip_grad_norm=1.0)
    objective = [{"term": "multihead_kd", "temperature": {"task": 2.0, "generalist": 4.0},
                  "head_weights": {"task": 1.0, "generalist": 0.5}, "fused_linear": args.fused_linear}]
    if args.probe_term:
        objective.append({"term": "regression_probe", "teacher": "generalist", "weight": 0.1})
    trainer = Consolidator(student, objective, data, teachers=teachers, train=train, optim=optim,
                           dist_context=ctx, example_images=torch.zeros(2, 3, 16, 16))
    if args.hang_after is not None:
        def hang(t: Consolidator) -> None:
            if t.step == args.hang_after:
                (Path(args.out) / "hung").write_text(str(t.step))
                time.sleep(600)
        trainer.add_callback(hang)
    if args.stop_rank is not None:
        def stop(t: Consolidator) -> None:
            if t.step == args.stop_after and t.ctx.rank == args.stop_rank:
                print(f"rank {t.ctx.rank} stops after step {t.step} ({args.stop_how})", flush=True)
                if args.stop_how == "exit":
                    os._exit(0)
                time.sleep(120)
        trainer.add_callback(stop)
    summary = trainer.fit()
    trainer.close()
    print("SUMMARY", summary, flush=True)


if __name__ == "__main__":
    main()
