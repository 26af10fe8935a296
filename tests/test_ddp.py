"""DDP: two gloo processes under torchrun match one process on the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "helpers" / "train_run.py"

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _final(out: Path, steps: int) -> dict:
    return torch.load(out / "checkpoints" / f"checkpoint_{steps:09d}.pt", weights_only=True, map_location="cpu")


def test_two_process_gloo_run_matches_single_process(tmp_path):
    # GroupNorm: per-sample normalisation, so splitting the batch over ranks changes
    # nothing but the order of floating-point sums.
    args = ["--steps", "6", "--checkpoint-every", "3", "--norm", "group"]
    single = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(tmp_path / "single"),
                               "--batch-size", "8", *args], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(SCRIPT), "--out", str(tmp_path / "ddp"), "--batch-size", "4", *args],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    out, err = single.communicate(timeout=600)
    assert single.returncode == 0, err[-3000:]

    reference, distributed = _final(tmp_path / "single", 6), _final(tmp_path / "ddp", 6)
    assert distributed["world_size"] == 2 and reference["world_size"] == 1
    for key, value in reference["model"].items():
        torch.testing.assert_close(distributed["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    # Each rank saw its own shard, and its position was saved.
    ranks = distributed["ranks"]
    assert [r["data"]["proxy"]["dataset"]["batches_consumed"] for r in ranks] == [1, 1]  # 6 steps = 5 + 1
    # Only rank 0 wrote: one metrics line per step, one checkpoint per save.
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == [
        "checkpoint_000000003.pt", "checkpoint_000000006.pt"]
    # The logged loss is the mean over ranks: the same as the single process's.
    single_loss = (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()
    for a, b in zip(lines, single_loss):
        assert json.loads(a)["loss"] == pytest.approx(json.loads(b)["loss"], rel=1e-4)
