"""DDP: two gloo processes under torchrun match one process on the same global batch."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers.subprocesses import subprocess_env as _env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "helpers" / "train_run.py"

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")


def _final(out: Path, steps: int) -> dict:
    return torch.load(out / "checkpoints" / f"checkpoint_{steps:09d}.pt", weights_only=True, map_location="cpu")


# The run train_run.py makes: KD heads (name: (classes, temperature, weight)).
KD_HEADS = {"task": (3, 2.0, 1.0), "generalist": (6, 4.0, 0.5)}
GLOBAL_BATCH = 8


def kd_loss_tolerance() -> float:
    """How far two correct runs' logged multi-head KD losses can differ, from float32 rounding alone.

    DDP computes the same thing in another order: each rank's batch-mean over
    half the rows, averaged over ranks, and gradients all-reduced, where one
    process sums all rows at once. So the two runs carry different float32
    rounding, deterministic in each (run twice, each is bitwise identical).
    That rounding scales with the summands, not with the result: per row the
    loss is sum_h w_h tau_h^2 sum_c p_c (log p_c - log q_c), whose summands
    stay of size w_h tau_h^2 (|p log p| + |p log q|) -- at most
    w_h tau_h^2 2 log C_h per row (entropy bound; cross-entropy ~ entropy near
    convergence) -- while the KL they cancel to falls to ~4e-3 as the student
    learns. A relative tolerance on that small difference is the wrong measure
    (rel 1.6e-4 at step 6 was 7e-7 absolute). The standard bound on a sum of
    n float32 terms, n * eps * sum|terms|, with n = C_max + global batch
    summations, gives an absolute tolerance (~6e-5 here).
    """
    eps = torch.finfo(torch.float32).eps
    summands = sum(w * tau ** 2 * 2 * math.log(c) for c, tau, w in KD_HEADS.values())
    n = max(c for c, _, _ in KD_HEADS.values()) + GLOBAL_BATCH
    return n * eps * summands


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["kd", "term-parameters", "fused-linear"])
def test_two_process_gloo_run_matches_single_process(tmp_path, variant):
    # GroupNorm: per-sample normalisation, so splitting the batch over ranks changes
    # nothing but the order of floating-point sums.
    args = ["--steps", "6", "--checkpoint-every", "3", "--norm", "group"]
    if variant == "term-parameters":
        args.append("--probe-term")  # an objective term with its own parameters, DDP-wrapped
    if variant == "fused-linear":
        args.append("--fused-linear")  # the heads' parameters are used outside DDP's forward (features only)
    single = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(tmp_path / "single"),
                               "--batch-size", str(GLOBAL_BATCH), *args], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(SCRIPT), "--out", str(tmp_path / "ddp"), "--batch-size", str(GLOBAL_BATCH // 2),
                          *args], env=_env(), capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    out, err = single.communicate(timeout=600)
    assert single.returncode == 0, err[-3000:]

    reference, distributed = _final(tmp_path / "single", 6), _final(tmp_path / "ddp", 6)
    assert distributed["world_size"] == 2 and reference["world_size"] == 1
    for section in ("model", "objective"):
        for key, value in reference[section].items():
            torch.testing.assert_close(distributed[section][key], value, rtol=1e-4, atol=1e-5, msg=key)
    if variant == "term-parameters":
        assert any(k.startswith("terms.regression_probe.") for k in reference["objective"])
    # Each rank saw its own shard, and its position was saved.
    ranks = distributed["ranks"]
    assert [r["data"]["proxy"]["dataset"]["batches_consumed"] for r in ranks] == [1, 1]  # 6 steps = 5 + 1
    # Only rank 0 wrote: one metrics line per step, one checkpoint per save.
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == [
        "checkpoint_000000003.pt", "checkpoint_000000006.pt"]
    # The logged losses are means over ranks: the single process's, up to rounding.
    single_lines = (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()
    for a, b in zip(lines, single_lines):
        a, b = json.loads(a), json.loads(b)
        assert a["terms"]["multihead_kd"] == pytest.approx(b["terms"]["multihead_kd"], abs=kd_loss_tolerance())
        if variant == "term-parameters":
            # an MSE: a sum of non-negative terms, so its rounding is relative (n * eps << 1e-4)
            assert a["terms"]["regression_probe"] == pytest.approx(b["terms"]["regression_probe"], rel=1e-4)
        else:
            assert a["loss"] == pytest.approx(b["loss"], abs=kd_loss_tolerance())


@pytest.mark.slow
@pytest.mark.parametrize("how", ["exit", "hang"])
def test_a_stopped_rank_is_a_clear_error_within_the_timeout(tmp_path, how):
    """A rank that leaves or hangs used to freeze the others for gloo's default 30 minutes (issue 8, item 17)."""
    timeout_s = 4
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(SCRIPT), "--out", str(tmp_path / "ddp"), "--batch-size", "4", "--steps", "50",
                          "--checkpoint-every", "0", "--norm", "group", "--stop-rank", "1", "--stop-after", "2",
                          "--stop-how", how, "--dist-timeout", str(timeout_s)],
                         env=_env(), capture_output=True, text=True, timeout=240)
    assert ddp.returncode != 0
    assert "rank 1 stops after step 2" in ddp.stdout
    assert "DistributedError: rank 0: a collective operation failed at step 3" in ddp.stderr, ddp.stderr[-4000:]
    assert f"did not answer within train.dist_timeout_s={timeout_s} s" in ddp.stderr
    if how == "hang":
        assert "Timed out" in ddp.stderr  # gloo's own words for the timeout, kept in the message
    assert not (tmp_path / "ddp" / "final.pt").exists()


def test_the_timeout_reaches_init_process_group_and_peer_failures_are_recognised(monkeypatch):
    import datetime

    from rcfast.train.distributed import is_collective_failure, setup_distributed
    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(seen))
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    for var, value in {"WORLD_SIZE": "2", "LOCAL_RANK": "1", "RANK": "1"}.items():
        monkeypatch.setenv(var, value)
    ctx = setup_distributed("cpu", "gloo", timeout_s=7.5)
    assert seen["timeout"] == datetime.timedelta(seconds=7.5) and seen["backend"] == "gloo"
    assert (ctx.rank, ctx.world_size) == (1, 2)
    seen.clear()
    for bad in (0, -1, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="train.dist_timeout_s"):
            setup_distributed("cpu", "gloo", timeout_s=bad)
    assert is_collective_failure(RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"))
    assert is_collective_failure(RuntimeError("[../unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation"))
    assert not is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"))
    assert not is_collective_failure(ValueError("gloo"))
