"""Checkpoint integrity: content hashes on everything rcfast writes, pinned teacher files, corrupt files refused.

torch's zip reader checks no CRCs: 200 flipped bytes in a tensor loaded and trained
silently (issue 8, item 15). Every checkpoint and ``final.pt`` now carries a
content hash, verified wherever rcfast loads one (resume, teachers, init_from,
eval); a config can pin a teacher file's sha256; a truncated or corrupt newest
checkpoint is skipped for the previous good one, with a warning naming both
(item 16).
"""
from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from helpers.tiny_run import one_line_error, proxy_folder, run_cli, tiny_run, write_config
from rcfast import cli
from rcfast.train import ConfigError, config_from_dict
from rcfast.train.checkpoint import (INTEGRITY_KEY, content_digest, file_sha256, list_checkpoints, load_checkpoint,
                                     save_checkpoint_file)
from rcfast.train.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")


def _flip_tensor_bytes(path: Path, tensor: torch.Tensor, count: int = 200) -> None:
    """Invert ``count`` bytes of ``tensor``'s data where it lies in ``path`` (stored uncompressed in the zip)."""
    raw = path.read_bytes()
    needle = tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()
    offset = raw.find(needle)
    assert offset >= 0 and raw.find(needle, offset + 1) < 0, "tensor bytes not found once in the file"
    data = bytearray(raw)
    for i in range(offset, offset + min(count, len(needle))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _state() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"format": "rcfast.model/1", "w": torch.randn(3, 4, generator=gen),
            "bf": torch.randn(5, generator=gen).bfloat16(), "flags": torch.tensor([True, False]),
            "scalar": torch.tensor(2.5), "empty": torch.empty(0, 3),
            "meta": {"step": 3, "lr": 1e-3, "name": "é", "none": None, "on": True, "shape": [1, (2, 3)]}}


@pytest.mark.parametrize("change", [
    lambda s: s["w"].__setitem__((0, 0), s["w"][0, 0] + 1),   # one value
    lambda s: s["meta"].__setitem__("step", 4),
    lambda s: s["meta"].__setitem__("lr", 1e-3 + 1e-18),       # the last bit of a float
    lambda s: s["meta"].__setitem__("on", 1),                   # bool -> int
    lambda s: s["meta"]["shape"].__setitem__(1, [2, 3]),        # tuple -> list
    lambda s: s.__setitem__("w", s["w"].double()),              # dtype
    lambda s: s.__setitem__("w", s["w"].reshape(4, 3)),         # shape (same bytes)
    lambda s: s.__setitem__("extra", 0),                        # a key
], ids=["value", "int", "float-bit", "bool-int", "tuple-list", "dtype", "shape", "key"])
def test_content_hash_sees_every_kind_of_change(change):
    digest = content_digest(_state())
    assert content_digest(_state()) == digest  # deterministic
    changed = _state()
    change(changed)
    assert content_digest(changed) != digest


def test_content_hash_refuses_objects_it_cannot_hash():
    with pytest.raises(TypeError, match="cannot hash a object"):
        content_digest({"x": object()})


def test_flipped_tensor_bytes_are_detected_on_load(tmp_path):
    weight = torch.randn(64, 64)
    path = save_checkpoint_file({"format": "rcfast.model/1", "model": {"w": weight}}, tmp_path / "final.pt")
    loaded = load_checkpoint(path)
    assert INTEGRITY_KEY not in loaded and torch.equal(loaded["model"]["w"], weight)
    assert torch.load(path, weights_only=True)[INTEGRITY_KEY] == content_digest(loaded)
    _flip_tensor_bytes(path, weight)
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["w"], weight)  # torch itself loads it
    with pytest.raises(CheckpointError, match=r"final\.pt is corrupt: its contents do not match their sha256"):
        load_checkpoint(path)


def test_a_file_claiming_to_be_rcfast_s_needs_its_hash_and_plain_state_dicts_load(tmp_path):
    torch.save({"format": "rcfast.consolidator/2", "model": {}}, tmp_path / "stripped.pt")
    with pytest.raises(CheckpointError, match="carries no content hash"):
        load_checkpoint(tmp_path / "stripped.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")  # a state_dict from elsewhere: no hash, loads
    assert torch.equal(load_checkpoint(tmp_path / "plain.pt")["w"], torch.ones(2))


@pytest.mark.parametrize("kind,message", [
    ("missing", "does not exist"),
    ("directory", "is a directory, not a checkpoint file"),
    ("empty", r"is empty \(0 bytes\)"),
    ("truncated", "truncated"),
    ("code", r"holds code or objects other than tensors and plain data \(.*print\)"),
    ("zip", "a zip archive, but not a torch checkpoint"),
    ("png", "not a torch checkpoint"),
])
def test_unusable_files_are_named_with_the_reason(tmp_path, kind, message):
    path = tmp_path / "x.pt"
    good = save_checkpoint_file({"model": {"w": torch.randn(256)}}, tmp_path / "good.pt").read_bytes()
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "code":
        torch.save({"model": {}, "hook": print}, path)
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes/readme.txt", "not a checkpoint")
    elif kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path, what="teacher 'a': checkpoint")
    assert str(info.value).startswith("teacher 'a': checkpoint") and "\n" not in str(info.value)


def _train_tiny(tmp_path, capsys, **train) -> Path:
    config = tiny_run(tmp_path, steps=train.pop("steps", 3))
    config["train"].update(train)
    path = write_config(tmp_path / "run.yaml", config)
    assert cli.main(["consolidate", "--config", str(path)]) == 0
    capsys.readouterr()
    return path


@pytest.mark.slow
def test_everything_a_run_writes_is_hashed_and_a_corrupt_newest_checkpoint_is_skipped(tmp_path, capsys):
    path = _train_tiny(tmp_path, capsys, steps=3)
    run = tmp_path / "run"
    for file in [run / "final.pt"] + [p for _, p in list_checkpoints(run / "checkpoints")]:
        raw = torch.load(file, weights_only=True)
        assert raw[INTEGRITY_KEY] == content_digest({k: v for k, v in raw.items() if k != INTEGRITY_KEY}), file
    assert torch.load(run / "final.pt", weights_only=True)["format"] == "rcfast.model/1"

    # The newest checkpoint damaged (200 bytes of a tensor flipped), the one before truncated to half:
    # the run resumes from the oldest good one, warning about each file it skipped.
    ckpts = [p for _, p in list_checkpoints(run / "checkpoints")]
    assert [p.name[-6:] for p in ckpts] == ["001.pt", "002.pt", "003.pt"]
    newest = torch.load(ckpts[2], weights_only=True)
    _flip_tensor_bytes(ckpts[2], newest["model"]["backbone.body.0.weight"])
    ckpts[1].write_bytes(ckpts[1].read_bytes()[:1000])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["consolidate", "--config", str(path), "--set", "train.max_steps=4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["resumed_from"] == str(ckpts[0]) and (summary["steps"], summary["trained_steps"]) == (4, 3)
    messages = [str(w.message) for w in caught if "resuming from" in str(w.message)]
    assert len(messages) == 2, [str(w.message) for w in caught]
    assert messages[0].startswith(f"checkpoint {ckpts[2]} is corrupt")
    assert messages[1].startswith(f"checkpoint {ckpts[1]} is not a loadable weights-only checkpoint: truncated")
    assert all(f"resuming from {ckpts[0]} instead" in m for m in messages)
    # the damaged files were written over by the resumed run's own checkpoints
    assert load_checkpoint(ckpts[2])["step"] == 3 and load_checkpoint(ckpts[1])["step"] == 2


def test_all_checkpoints_unusable_is_an_error_not_a_fresh_start(tmp_path, capsys):
    path = _train_tiny(tmp_path, capsys, steps=2)
    for _, ckpt in list_checkpoints(tmp_path / "run" / "checkpoints"):
        ckpt.write_bytes(ckpt.read_bytes()[:500])
    assert cli.main(["consolidate", "--config", str(path), "--set", "train.max_steps=3"]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert "no usable checkpoint in" in error and "train.resume: none" in error, error
    # an explicitly named checkpoint that is damaged is an error too (no silent fallback)
    ckpt = list_checkpoints(tmp_path / "run" / "checkpoints")[0][1]
    assert cli.main(["consolidate", "--config", str(path), "--set", f"train.resume={ckpt}"]) == 2
    assert "train.resume checkpoint" in one_line_error(capsys.readouterr().err)


def test_a_pinned_teacher_sha256_must_match_before_anything_loads(tmp_path, capsys):
    config = tiny_run(tmp_path)
    teacher = Path(config["teachers"][0]["checkpoint"])
    config["teachers"][0]["sha256"] = hashlib.sha256(teacher.read_bytes()).hexdigest().upper()  # any case
    path = write_config(tmp_path / "run.yaml", config)
    assert cli.main(["consolidate", "--config", str(path), "--print-config"]) == 0
    capsys.readouterr()
    # a plain state_dict (no content hash) with flipped bytes: only the pin can tell
    state = torch.load(teacher, weights_only=True)
    _flip_tensor_bytes(teacher, state["backbone.body.0.weight"])
    assert cli.main(["consolidate", "--config", str(path)]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert f"has sha256 {file_sha256(teacher)}, but teachers[].sha256 pins" in error, error
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
    config["teachers"][0]["sha256"] = "abc"
    with pytest.raises(ConfigError, match=r"teachers\[0\].sha256 must be 64 hex digits"):
        config_from_dict(config)


def test_an_rcfast_teacher_with_flipped_bytes_is_refused_without_a_pin(tmp_path, capsys):
    """A final.pt used as a teacher carries its content hash: damage is caught even when nothing is pinned."""
    _train_tiny(tmp_path / "first", capsys, steps=1)
    final = tmp_path / "first" / "run" / "final.pt"
    config = tiny_run(tmp_path)
    config["teachers"][0].update(checkpoint=str(final), num_classes=3)
    config["student"]["heads"] = {"t": 3}
    _flip_tensor_bytes(final, torch.load(final, weights_only=True)["model"]["backbone.body.0.weight"])
    path = write_config(tmp_path / "run.yaml", config)
    assert cli.main(["consolidate", "--config", str(path)]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert "teacher 't': checkpoint" in error and "is corrupt" in error, error


def _damaged_final(tmp_path: Path, damage: str) -> tuple[Path, Path]:
    """A task folder and a final.pt damaged as ``damage`` says."""
    task = tmp_path / "task"
    for split in ("train", "test"):
        for c in range(2):
            proxy_folder(task / split / f"c{c}", count=4, seed=c)
    final = tmp_path / "final.pt"
    weight = torch.randn(16, 3, 3, 3)
    save_checkpoint_file({"format": "rcfast.model/1", "model": {"backbone.body.0.weight": weight}}, final)
    raw = final.read_bytes()
    if damage == "truncated":
        final.write_bytes(raw[: len(raw) // 3])
    elif damage == "empty":
        final.write_bytes(b"")
    elif damage == "code":
        torch.save({"model": {"w": torch.ones(1)}, "config": {"student": print}}, final)
    elif damage == "zip":
        final.unlink()
        with zipfile.ZipFile(final, "w") as archive:
            archive.writestr("archive/data.pkl", b"not a pickle")
    else:
        _flip_tensor_bytes(final, weight)
    return task, final


@pytest.mark.parametrize("damage", ["truncated", "empty", "code", "zip", "flipped"])
def test_rcfast_eval_on_a_damaged_checkpoint_is_a_one_line_error(tmp_path, capsys, damage):
    task, final = _damaged_final(tmp_path, damage)
    assert cli.main(["eval", "--checkpoint", str(final), "--data", str(task), "--data-backend", "pil"]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert f"--checkpoint {final}" in error, error


@pytest.mark.slow
def test_rcfast_eval_on_a_malicious_checkpoint_in_a_subprocess(tmp_path):
    task, final = _damaged_final(tmp_path, "code")
    result = run_cli("eval", "--checkpoint", str(final), "--data", str(task), "--data-backend", "pil", timeout=120)
    assert result.returncode == 2, result.stdout
    error = one_line_error(result.stderr)
    assert f"--checkpoint {final} is not a loadable weights-only checkpoint: it holds code" in error, error


@pytest.mark.slow
def test_the_command_warns_in_one_line_when_it_skips_a_truncated_newest_checkpoint(tmp_path):
    config = tiny_run(tmp_path, steps=2)
    path = write_config(tmp_path / "run.yaml", config)
    assert run_cli("consolidate", "--config", str(path)).returncode == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    newest = checkpoints / "checkpoint_000000002.pt"
    newest.write_bytes(newest.read_bytes()[:2000])  # a run killed while the disk filled, a copy cut short...
    result = run_cli("consolidate", "--config", str(path), "--set", "train.max_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    warning = [line for line in result.stderr.splitlines() if line.startswith("rcfast: warning: ")]
    assert len(warning) == 1 and "Traceback" not in result.stderr, result.stderr
    assert warning[0].startswith(f"rcfast: warning: checkpoint {newest} is not a loadable weights-only checkpoint: "
                                 "truncated")
    assert warning[0].endswith(f"resuming from {checkpoints / 'checkpoint_000000001.pt'} instead")
    assert json.loads(result.stdout)["resumed_from"] == str(checkpoints / "checkpoint_000000001.pt")


# --------------------------------------------------------------------------- rcfast.atomic
def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    from rcfast.atomic import atomic_file, atomic_write_json

    path = tmp_path / "out" / "data.json"
    atomic_write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(ZeroDivisionError):
        with atomic_file(path) as f:
            f.write(b"half of the new contents")
            1 / 0
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.json"]  # no temporary file left
    atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}


def test_an_atomic_write_into_an_unwritable_folder_names_the_file(tmp_path):
    from rcfast.atomic import atomic_file

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(OSError, match=r"cannot write .*not_a_folder/x\.bin"):
        with atomic_file(blocker / "x.bin") as f:
            f.write(b"x")
