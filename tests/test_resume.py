"""Exact resume: a run SIGKILLed mid-training and resumed ends bitwise equal to an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "helpers" / "train_run.py"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), *extra], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout


def _kill_after(out: Path, hang_after: int, *extra: str) -> None:
    """Start a run, wait until it reports step ``hang_after``, then SIGKILL it."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), "--hang-after", str(hang_after),
                             *extra], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    marker = out / "hung"
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training run exited early:\n{proc.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("training run never reached the kill point")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _final_state(out: Path, step: int) -> dict:
    return torch.load(out / "checkpoints" / f"checkpoint_{step:09d}.pt", weights_only=True, map_location="cpu")


def _assert_bitwise_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
@pytest.mark.parametrize("source", ["tensors", "images", "term-parameters"])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, source):
    """Kill -9 after step 5 (last checkpoint: step 3), resume, compare with a run never stopped.

    ``images`` runs the real data pipeline (``ProxyImages``, DALI when installed)
    with random-resized-crop augmentation, so the data position is tested too.
    ``term-parameters`` adds an objective term with trainable parameters of its
    own (``regression_probe``), which must resume exactly too.
    The loss runs on the backend ``"auto"`` picks (the fused CPU kernel when built).
    """
    extra = ["--steps", "9", "--checkpoint-every", "3"]
    if source == "term-parameters":
        extra.append("--probe-term")
    if source == "images":
        from PIL import Image
        import numpy as np
        image_dir = tmp_path / "images"
        image_dir.mkdir()
        rng = np.random.default_rng(0)
        for i in range(40):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(image_dir / f"{i:03d}.png")
        extra += ["--image-dir", str(image_dir)]

    full, killed = tmp_path / "full", tmp_path / "killed"
    uninterrupted = _start(full, *extra)  # runs alongside the killed run: two cores
    # Killed after step 5: the checkpoint of step 3 exists, step 6's does not, and
    # steps 4-5 are lost work the resumed run must redo identically.
    _kill_after(killed, 5, *extra)
    steps = sorted(p.name for p in (killed / "checkpoints").glob("checkpoint_*.pt"))
    assert steps == ["checkpoint_000000003.pt"]
    resumed_out = _finish(_start(killed, *extra))
    assert "checkpoint_000000003.pt" in resumed_out  # it did resume, from step 3
    _finish(uninterrupted)

    reference, resumed = _final_state(full, 9), _final_state(killed, 9)
    for key in ("model", "objective", "optimizer", "scheduler", "scaler", "step"):
        _assert_bitwise_equal(reference[key], resumed[key], key)
    # The data position and RNG after the last step agree too.
    _assert_bitwise_equal(reference["ranks"], resumed["ranks"], "ranks")
    if source == "term-parameters":
        assert any(k.startswith("terms.regression_probe.") for k in reference["objective"])
    # The metrics of the lost steps were dropped and logged again, once each.
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 10))
