"""Training runs on a GPU: NCCL DDP over the GPUs present, and fp16 with GradScaler resumed exactly.

Every test here is marked ``gpu``: skipped on machines without CUDA, run by
``scripts/gpu_check.sh`` on one that has it. They start ``tests/helpers/train_run.py``
in subprocesses, as the CPU tests in test_ddp.py and test_resume.py do.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers.subprocesses import subprocess_env as _env
from test_ddp import _final

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "helpers" / "train_run.py"

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def _run(args: list[str], *, ranks: int = 0) -> None:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks else [sys.executable])
    done = subprocess.run([*launcher, str(SCRIPT), "--device", "cuda", *args], env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.skipif(not dist.is_available() or not dist.is_nccl_available(), reason="torch built without NCCL")
def test_nccl_ddp_over_every_gpu_matches_one_process(tmp_path):
    ranks = torch.cuda.device_count()
    global_batch = 4 * ranks
    common = ["--steps", "6", "--checkpoint-every", "3", "--norm", "group"]
    _run(["--out", str(tmp_path / "single"), "--batch-size", str(global_batch), *common])
    _run(["--out", str(tmp_path / "ddp"), "--batch-size", "4", *common], ranks=ranks)
    reference, distributed = _final(tmp_path / "single", 6), _final(tmp_path / "ddp", 6)
    assert distributed["world_size"] == ranks
    # GPU reductions (NCCL's ring, cuDNN's kernels) order sums differently from one process: close, not equal.
    for key, value in reference["model"].items():
        torch.testing.assert_close(distributed["model"][key], value, rtol=1e-3, atol=1e-4, msg=key)
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line)["loss"] == json.loads(line)["loss"] for line in lines)


def test_fp16_gradscaler_run_resumes_to_the_same_weights(tmp_path):
    common = ["--precision", "fp16", "--norm", "group", "--checkpoint-every", "3"]
    _run(["--out", str(tmp_path / "straight"), "--steps", "6", *common])
    _run(["--out", str(tmp_path / "resumed"), "--steps", "3", *common])
    _run(["--out", str(tmp_path / "resumed"), "--steps", "6", *common])
    straight, resumed = _final(tmp_path / "straight", 6), _final(tmp_path / "resumed", 6)
    # The scaler really ran (a scale was saved) and was restored on resume.
    assert straight["scaler"] and straight["scaler"]["scale"] == resumed["scaler"]["scale"]
    for key, value in straight["model"].items():
        assert torch.isfinite(value.float()).all(), key
        assert torch.equal(resumed["model"][key], value), key
