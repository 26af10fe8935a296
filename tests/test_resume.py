"""Resume: a SIGKILLed run resumes bitwise exactly; a resume continues the same run or is refused.

The second half covers what may change between a run and its continuation
(run-length, logging, checkpoint, location and thread fields), what is refused
(anything else, naming every field), ``max_steps`` below the checkpoint's step,
a completed run, and ``--allow-config-change`` (issue 8, item 12).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers.subprocesses import sigkill_when
from helpers.tiny_run import one_line_error, run_cli, tiny_run, write_config
from rcfast import cli
from rcfast.train import ConfigError, config_from_dict, config_to_dict
from rcfast.train.checkpoint import load_checkpoint
from rcfast.train.resume import RESUMABLE_CHANGES, ResumePoint, check_resume, config_changes

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
    sigkill_when(out / "hung", [sys.executable, str(SCRIPT), "--out", str(out), "--hang-after", str(hang_after), *extra],
                 timeout_s=240)


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


# ---------------------------------------------------------------------------------------------------------------
# Resuming into an out_dir that holds a run: the same run continues, anything else is refused (issue 8, item 12).


def _snapshot(run: Path) -> dict:
    """Every file of a run folder and its bytes (what a refused command must leave untouched)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_resume_with_a_changed_config_is_refused_and_changes_nothing(tmp_path):
    """The original failure: another optim.lr and temperature resumed the old run, trained 0 steps, printed
    loss NaN, exited 0 and rewrote config.yaml/final.pt as if the new config had been used."""
    path = write_config(tmp_path / "run.yaml", tiny_run(tmp_path, steps=2))
    first = run_cli("consolidate", "--config", str(path))
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "run"
    before = _snapshot(run)
    again = run_cli("consolidate", "--config", str(path), "--set", "optim.lr=0.01",
                    "--set", "objective.0.temperature=2.0")
    assert again.returncode == 2, again.stdout
    error = one_line_error(again.stderr)
    assert "optim.lr: 0.001 -> 0.01" in error and "objective[0].temperature: 4.0 -> 2.0" in error, error
    assert "2 field(s)" in error and "--allow-config-change" in error
    assert again.stdout == ""
    assert _snapshot(run) == before  # config.yaml, final.pt, metrics, checkpoints: all as they were


def test_resume_rules_in_process(tmp_path, capsys, one_thread):
    path = write_config(tmp_path / "run.yaml", tiny_run(tmp_path, steps=2))
    assert cli.main(["consolidate", "--config", str(path)]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    before = _snapshot(run)

    # max_steps below the checkpoint's step: an error naming both, not "0 steps, loss NaN, exit 0"
    assert cli.main(["consolidate", "--config", str(path), "--set", "train.max_steps=1"]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert "train.max_steps=1 is below the step of the checkpoint" in error and "(step 2)" in error, error
    assert _snapshot(run) == before

    # the same config again: the run is complete -- its true step count, its loss, nothing rewritten
    assert cli.main(["consolidate", "--config", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["trained_steps"] == 0 and math.isfinite(summary["loss"])
    assert _snapshot(run) == before

    # run-length and logging fields may change: the run continues
    assert cli.main(["consolidate", "--config", str(path), "--set", "train.max_steps=3",
                     "--set", "train.log_every=2", "--set", "train.keep_checkpoints=2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["steps"], summary["trained_steps"]) == (3, 1) and summary["resumed_from"].endswith("2.pt")
    final = load_checkpoint(run / "final.pt")
    assert [entry["step"] for entry in final["config_changes"]] == [2]
    assert {c[0] for c in final["config_changes"][0]["changes"]} == {"train.max_steps", "train.log_every",
                                                                   "train.keep_checkpoints"}
    assert not list(run.glob("config.before_step_*.yaml"))  # nothing but run-length/logging changed

    # another learning rate, explicitly allowed: the run continues under it, and says so
    assert cli.main(["consolidate", "--config", str(path), "--set", "train.max_steps=4", "--set", "optim.lr=0.002",
                     "--allow-config-change"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["steps"], summary["trained_steps"]) == (4, 1)
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.002
    assert yaml.safe_load((run / "config.before_step_3.yaml").read_text())["optim"]["lr"] == 0.001
    final = load_checkpoint(run / "final.pt")
    assert final["config"]["optim"]["lr"] == 0.002 and final["step"] == 4
    assert ["optim.lr", 0.001, 0.002] in final["config_changes"][1]["changes"]
    assert final["config_changes"][1]["step"] == 3


def test_config_changes_name_every_field_and_ignore_defaults():
    base = config_to_dict(config_from_dict({
        "teachers": [{"name": "a", "builder": "small_cnn", "checkpoint": "a.pt", "num_classes": 5}],
        "data": {"source": "p"}, "objective": [{"term": "multihead_kd"}]}))
    changed = json.loads(json.dumps(base))
    changed["optim"]["lr"] = 0.5
    changed["teachers"][0]["builder_kwargs"] = {"width": 8}
    changed["objective"].append({"term": "cross_entropy", "head": "a"})
    changed["train"]["max_steps"] = 7
    found = {key: (a, b) for key, a, b in config_changes(base, changed)}
    assert found == {"optim.lr": (0.001, 0.5), "teachers[0].builder_kwargs.width": ("<absent>", 8),
                     "teachers[0].builder_kwargs": ({}, "<absent>"),
                     "objective[1].term": ("<absent>", "cross_entropy"), "objective[1].head": ("<absent>", "a"),
                     "train.max_steps": (1000, 7)}
    # a field a newer rcfast added, stored by an older one: compared at its default, so no change
    older = json.loads(json.dumps(base))
    del older["train"]["dist_timeout_s"], older["teachers"][0]["sha256"]
    assert config_changes(older, base) == []
    same = json.loads(json.dumps(base))
    same["optim"]["lr"], same["student"]["backbone_kwargs"] = 1, {"width": 4}
    base_int = json.loads(json.dumps(base))
    base_int["optim"]["lr"], base_int["student"]["backbone_kwargs"] = 1.0, {"width": 4.0}
    assert config_changes(base_int, same) == []  # 1 and 1.0 are the same setting

    point = ResumePoint(Path("ck.pt"), {"step": 5, "config": base})
    refused = r"in 2 field\(s\): teachers\[0\].builder: 'small_cnn' -> 'resnet18'; optim.lr: 0.001 -> 0.5\."
    with pytest.raises(ConfigError, match=refused):
        check_resume(point, dict(base, optim=dict(base["optim"], lr=0.5),
                                 teachers=[dict(base["teachers"][0], builder="resnet18")]), 10, False)
    assert check_resume(point, dict(base, optim=dict(base["optim"], lr=0.5)), 10, True) == [("optim.lr", 0.001, 0.5)]
    assert {key for key, _, _ in check_resume(point, dict(base, train=dict(base["train"], max_steps=9,
                                                                             log_every=3)), 9, False)} <= \
        RESUMABLE_CHANGES
    with pytest.raises(ConfigError, match=r"train.max_steps=4 is below .* \(step 5\)"):
        check_resume(point, base, 4, True)
    # a teacher file whose bytes changed under the same path is a change too
    point.state["teacher_files"] = {"a": "0" * 64}
    with pytest.raises(ConfigError, match="teacher 'a' checkpoint file sha256"):
        check_resume(point, base, 10, False, teacher_files={"a": "1" * 64})


def test_a_run_never_mixes_its_checkpoints_with_another_s(tmp_path, capsys, one_thread):
    path = write_config(tmp_path / "run.yaml", tiny_run(tmp_path, steps=3))
    assert cli.main(["consolidate", "--config", str(path)]) == 0
    capsys.readouterr()
    checkpoints = tmp_path / "run" / "checkpoints"
    before = _snapshot(tmp_path / "run")
    # starting afresh on top of them: pruning would have deleted the new run's checkpoints, kept the old
    assert cli.main(["consolidate", "--config", str(path), "--set", "train.resume=none"]) == 2
    assert "already holds checkpoints of a run (up to step 3)" in one_line_error(capsys.readouterr().err)
    # going back to step 1 while steps 2 and 3 are still there
    first = checkpoints / "checkpoint_000000001.pt"
    assert cli.main(["consolidate", "--config", str(path), "--set", f"train.resume={first}"]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert "holds newer checkpoints ['checkpoint_000000002.pt', 'checkpoint_000000003.pt']" in error, error
    assert _snapshot(tmp_path / "run") == before
    # moved away, the rollback is allowed
    for name in ("checkpoint_000000002.pt", "checkpoint_000000003.pt"):
        (checkpoints / name).rename(tmp_path / name)
    assert cli.main(["consolidate", "--config", str(path), "--set", f"train.resume={first}"]) == 0
    assert json.loads(capsys.readouterr().out)["trained_steps"] == 2
