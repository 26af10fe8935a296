"""A tiny ``rcfast consolidate`` run on disk, for tests that use the command as a user would.

``tiny_run(tmp_path)`` writes a teacher checkpoint (a 4-wide ``small_cnn``), a
folder of 16 small PNGs (the proxy data) and returns a config dict that
distils the teacher in a few steps on the PIL backend in one process. Tests
change the dict, write it with :func:`write_config`, and run it in-process
(``rcfast.cli.main``) or, where the process matters, in a subprocess
(:func:`run_cli`).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from rcfast.models import build_classifier

REPO = Path(__file__).resolve().parents[2]


def teacher_checkpoint(path: Path, num_classes: int = 3, seed: int = 0) -> Path:
    """A plain state_dict of ``build_classifier("small_cnn", num_classes, width=4)`` (no rcfast hash)."""
    torch.manual_seed(seed)
    model = build_classifier("small_cnn", num_classes, width=4)
    with torch.no_grad():
        model.heads.weight.mul_(20.0)  # a sharper random teacher
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def proxy_folder(root: Path, count: int = 16, seed: int = 0) -> Path:
    """``count`` random 12x12 PNGs."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


def tiny_run(tmp_path: Path, steps: int = 2, checkpoint_every: int = 1) -> dict:
    """The config dict of a tiny distillation run under ``tmp_path`` (files created)."""
    teacher = tmp_path / "teacher.pt"
    if not teacher.exists():
        teacher_checkpoint(teacher)
    proxy = tmp_path / "proxy"
    if not proxy.exists():
        proxy_folder(proxy)
    return {
        "student": {"backbone": "small_cnn", "backbone_kwargs": {"width": 4}},
        "teachers": [{"name": "t", "builder": "small_cnn", "checkpoint": str(teacher), "num_classes": 3,
                      "builder_kwargs": {"width": 4}}],
        "data": {"source": str(proxy), "image_size": 16, "batch_size": 4, "augment": "none", "backend": "pil",
                 "num_threads": 0, "shuffle": True},
        "objective": [{"term": "multihead_kd", "temperature": 4.0}],
        "optim": {"lr": 0.001},
        "train": {"max_steps": steps, "checkpoint_every": checkpoint_every, "keep_checkpoints": 5, "log_every": 1,
                  "progress": False, "out_dir": str(tmp_path / "run"), "num_threads": 1, "seed": 0},
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cli_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RCFAST_DEBUG"):
        env.pop(var, None)
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 300, preexec_fn=None, **env: str) -> subprocess.CompletedProcess:
    """``python -m rcfast.cli ARGS`` in a subprocess (what the ``rcfast`` console script runs)."""
    return subprocess.run([sys.executable, "-m", "rcfast.cli", *args], env=cli_env(**env), capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec_fn)


def one_line_error(stderr: str) -> str:
    """The ``rcfast: error: ...`` line of a failed command; asserts it is the only error output, with no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("rcfast: warning: ")]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("rcfast: error: "), stderr[-3000:]
    return lines[0]
