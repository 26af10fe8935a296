"""The teacher cache across processes: a SIGKILLed build resumes to the same files, a SIGKILLed top-k run resumes
to bitwise the same weights, and DDP ranks read their own samples (two gloo processes match the online run)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers.cache_run import make_run, write_config
from helpers.subprocesses import sigkill_when, subprocess_env as _env
from rcfast.train import Consolidator, load_config
from rcfast.train.teacher_cache import CacheError, build_teacher_cache

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "helpers" / "cache_run.py"
# The owner of the process applies these (cache_run.py calls apply_runtime): bitwise-reproducible CPU runs.
DETERMINISTIC = ["--set", "train.deterministic=true", "--set", "train.num_threads=1"]


def _run(*args: str, torchrun: bool = False) -> str:
    prefix = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun
              else [sys.executable])
    proc = subprocess.run([*prefix, str(SCRIPT), *args], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def _kill_when(marker: Path, *args: str) -> None:
    """Start cache_run.py, wait for it to write ``marker`` (it then sleeps), SIGKILL it."""
    sigkill_when(marker, [sys.executable, str(SCRIPT), *args])


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.name != "hung"}


@pytest.fixture
def run_config(tmp_path):
    return write_config(tmp_path / "run.yaml", make_run(tmp_path / "files"))


@pytest.mark.slow
def test_a_build_killed_mid_write_resumes_to_the_same_cache(tmp_path, run_config, one_thread):
    config = load_config(run_config)
    reference = build_teacher_cache(config, tmp_path / "reference", top_k=8, chunk_batches=2, progress=False)
    killed = tmp_path / "killed"
    # Killed with the 5th chunk's temporary file half written (chunks 1-4 complete).
    _kill_when(killed / "hung", "build", "--config", str(run_config), "--top-k", "8", "--chunk-batches", "2",
               *DETERMINISTIC, "--out", str(killed), "--hang-in-chunk", "5")
    assert list(killed.rglob(".*.tmp-*")), "the kill should leave the torn temporary file behind"
    assert len([p for p in killed.rglob("*.json") if p.name != "manifest.json"]) == 4
    # A run refuses the unfinished cache before training, naming the first missing chunk.
    run = load_config(run_config, [f"teacher_cache={killed}"])
    with pytest.raises(CacheError, match=r"is incomplete or damaged: .*epoch_00001/shard_0000_chunk_00001.bin is "
                                         "missing"):
        Consolidator.from_config(run)
    resumed = build_teacher_cache(config, killed, top_k=8, chunk_batches=2, progress=False)
    assert (resumed["chunks_reused"], resumed["chunks_built"]) == (4, reference["chunks_built"] - 4)
    assert _files(killed) == _files(tmp_path / "reference")
    assert not list(killed.rglob(".*.tmp-*"))


@pytest.mark.slow
def test_a_top_k_cached_run_killed_and_resumed_matches_an_uninterrupted_one(tmp_path, run_config, one_thread):
    cache = tmp_path / "cache"
    build_teacher_cache(load_config(run_config), cache, top_k=8, progress=False)
    common = ["--config", str(run_config), "--set", f"teacher_cache={cache}", "--set", "train.checkpoint_every=3",
              *DETERMINISTIC]
    _run("train", *common, "--set", f"train.out_dir={tmp_path / 'straight'}")
    resumed = tmp_path / "resumed"
    # Killed after step 5 (last checkpoint: step 3), then resumed from it.
    _kill_when(resumed / "hung", "train", *common, "--set", f"train.out_dir={resumed}", "--hang-after", "5")
    _run("train", *common, "--set", f"train.out_dir={resumed}", "--set", "train.resume=auto")
    a = torch.load(tmp_path / "straight" / "checkpoints" / "checkpoint_000000010.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "checkpoint_000000010.pt", weights_only=True)
    for section in ("model", "optimizer"):
        flat_a, flat_b = _flatten(a[section]), _flatten(b[section])
        assert flat_a.keys() == flat_b.keys()
        for key in flat_a:
            assert _equal(flat_a[key], flat_b[key]), f"{section}.{key}"
    assert (resumed / "metrics.jsonl").read_text().count("\n") == 10


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}.{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in _flatten(value, f"{prefix}[{i}]").items()}
    return {prefix: tree}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_gloo_ranks_on_a_dense_cache_match_the_online_ddp_run_bitwise(tmp_path, run_config):
    """A cache built for 2 ranks: each rank reads its own samples, and the run is the online DDP run, bit for bit."""
    cache = tmp_path / "cache"
    _run("build", "--config", str(run_config), "--out", str(cache), "--set", "train.max_steps=6", *DETERMINISTIC,
         torchrun=True)  # each rank builds its own shard
    assert sorted(p.name for p in (cache / "epoch_00000").glob("*.bin")) == [
        "shard_0000_chunk_00000.bin", "shard_0001_chunk_00000.bin"]
    common = ["--config", str(run_config), "--set", "train.max_steps=6", *DETERMINISTIC]
    _run("train", *common, "--set", f"train.out_dir={tmp_path / 'online'}", torchrun=True)
    _run("train", *common, "--set", f"train.out_dir={tmp_path / 'cached'}", "--set", f"teacher_cache={cache}",
         torchrun=True)
    a = torch.load(tmp_path / "online" / "final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cached" / "final.pt", weights_only=True)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (tmp_path / "online" / "metrics.jsonl").read_text() == _without_speed(tmp_path / "cached" / "metrics.jsonl",
                                                                                 tmp_path / "online" / "metrics.jsonl")


def _without_speed(cached: Path, online: Path) -> str:
    """The cached run's metrics with the online run's images/s (the only field allowed to differ)."""
    import json

    lines = []
    for mine, theirs in zip(cached.read_text().splitlines(), online.read_text().splitlines()):
        record = json.loads(mine)
        record["images_per_sec"] = json.loads(theirs)["images_per_sec"]
        lines.append(json.dumps(record))
    return "".join(line + "\n" for line in lines)
