"""Configs (YAML <-> dataclasses), clear errors for bad configs, and the ``rcfast`` command end to end."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers.tiny_run import one_line_error, run_cli, tiny_run, write_config
from rcfast import cli
from rcfast.models import build_classifier
from rcfast.train import (ConfigError, Consolidator, RunConfig, TeacherConfig, config_from_dict, config_to_dict,
                          dump_config, load_config)
from rcfast.train.config import DataConfig, StudentConfig, TaskConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "configs").glob("*.yaml"))


# Tiny models run fastest (and reproducibly) on one thread (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_configs_round_trip(path, tmp_path):
    config = load_config(path)
    text = dump_config(config, tmp_path / "again.yaml")
    assert yaml.safe_load(text) == config_to_dict(config)
    assert load_config(tmp_path / "again.yaml") == config


def test_yaml_dataclass_yaml_round_trip_of_every_field(tmp_path):
    config = RunConfig(
        student=StudentConfig(backbone="small_cnn", heads={"a": 5, "t": 3}, init_from="init.pt"),
        teachers=[TeacherConfig(name="a", builder="small_cnn", checkpoint="a.pt", num_classes=5,
                                builder_kwargs={"width": 8}, generalist=True)],
        data=DataConfig(source="proxy", image_size=32, batch_size=16, shuffle=True, labels=True),
        tasks=[TaskConfig(name="t", source="t/train", num_classes=3)],
        objective=[{"term": "multihead_kd", "heads": ["a"], "temperature": 2.0},
                   {"term": "cross_entropy", "head": "a", "weight": 0.1, "data": "proxy"},
                   {"term": "cross_entropy", "head": "t", "weight": 2.0}],
        train=TrainConfig(max_steps=7, precision="bf16", num_threads=1))
    config.optim.clip_grad_norm = None
    path = tmp_path / "run.yaml"
    dump_config(config, path)
    loaded = load_config(path)
    assert loaded == config
    assert dump_config(loaded) == path.read_text()


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _minimal(tmp_path: Path, **teacher) -> dict:
    entry = {"name": "a", "builder": "small_cnn", "checkpoint": str(tmp_path / "a.pt"), "num_classes": 5,
             "builder_kwargs": {"width": 4}}
    entry.update(teacher)
    return {"teachers": [entry], "data": {"source": str(tmp_path), "image_size": 16, "batch_size": 4},
            "student": {"backbone_kwargs": {"width": 4}}, "objective": [{"term": "multihead_kd"}],
            "train": {"max_steps": 1, "out_dir": str(tmp_path / "out"), "progress": False}}


@pytest.mark.parametrize("where,patch,message", [
    ("top level", {"trainer": {}}, r"unknown config key trainer; valid keys: \['student'"),
    ("section", {"train": {"max_step": 3}}, r"unknown config key train\.max_step; valid keys of train"),
    ("list entry", {"teachers": [{"name": "a", "buildr": "x"}]}, r"unknown config key teachers\[0\]\.buildr"),
    ("type", {"train": {"max_steps": "ten"}}, r"train\.max_steps must be an integer"),
    ("value", {"train": {"precision": "fp8"}}, r"train\.precision must be one of"),
], ids=["top-level", "section", "list-entry", "type", "value"])
def test_bad_config_keys_and_values_are_named(tmp_path, where, patch, message):
    data = _minimal(tmp_path)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, data))


def test_set_overrides_and_print_config(tmp_path, capsys):
    path = _write(tmp_path, _minimal(tmp_path))
    assert cli.main(["consolidate", "--config", str(path), "--set", "train.max_steps=42",
                     "--set", "objective.0.temperature=2.5", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_steps"] == 42 and printed["objective"][0]["temperature"] == 2.5
    assert cli.main(["consolidate", "--config", str(path), "--set", "train.nope=1"]) == 2
    assert "unknown config key train.nope" in capsys.readouterr().err
    assert cli.main(["consolidate", "--config", str(path), "--set", "teachers.3.weight=1"]) == 2
    assert "not an index of a list of 1" in capsys.readouterr().err


def _teacher_checkpoint(tmp_path: Path, num_classes: int = 5) -> Path:
    path = tmp_path / "a.pt"
    torch.save(build_classifier("small_cnn", num_classes, width=4).state_dict(), path)
    return path


@pytest.mark.parametrize("case,message", [
    ("unknown builder", r"teacher 'a': cannot build 'resnet9000'.*unknown model 'resnet9000'"),
    ("head size", r"teacher 'a': checkpoint .*a\.pt does not fit builder 'small_cnn' with num_classes=7"),
    ("missing file", r"teacher 'a': checkpoint file .*missing\.pt does not exist"),
    ("not weights", r"teacher 'a': checkpoint .*code\.pt is not a loadable weights-only checkpoint: it holds code"),
], ids=["unknown-builder", "head-size", "missing-file", "not-weights"])
def test_bad_teachers_are_clear_errors(tmp_path, capsys, case, message):
    _teacher_checkpoint(tmp_path)
    patch = {"unknown builder": {"builder": "resnet9000"}, "head size": {"num_classes": 7},
             "missing file": {"checkpoint": str(tmp_path / "missing.pt")},
             "not weights": {"checkpoint": str(tmp_path / "code.pt")}}[case]
    # A pickled object that is not tensors: weights_only loading must refuse it.
    torch.save({"model": {"w": torch.zeros(1)}, "hook": print}, tmp_path / "code.pt")
    path = _write(tmp_path, _minimal(tmp_path, **patch))
    assert cli.main(["consolidate", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rcfast: error: ") and "Traceback" not in err
    assert re.search(message, err), err


def _image_tree(root: Path, classes: int, per_class: int, seed: int) -> Path:
    """Class folders of small PNGs whose colour depends on the class (a learnable task)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        base = rng.integers(0, 256, size=3)
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 25, size=(12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


@pytest.mark.slow
def test_cli_trains_a_teacher_distils_a_student_and_evaluates_it(tmp_path, capsys):
    teacher_data = _image_tree(tmp_path / "teacher_data", 3, 8, seed=0)
    proxy = tmp_path / "proxy"
    proxy.mkdir()
    for i, png in enumerate(sorted(teacher_data.rglob("*.png"))):
        (proxy / f"{i:03d}.png").write_bytes(png.read_bytes())
    task = tmp_path / "task"
    _image_tree(task / "train", 2, 10, seed=1)
    _image_tree(task / "test", 2, 6, seed=1)
    common = {"student": {"backbone": "small_cnn", "backbone_kwargs": {"width": 4}},
              "optim": {"lr": 0.01}}
    data = {"image_size": 16, "batch_size": 8, "augment": "none", "shuffle": True, "backend": "pil",
            "num_threads": 0}
    teacher_cfg = dict(common, tasks=[{"name": "colours", "source": str(teacher_data), "num_classes": 3}],
                       objective=[{"term": "cross_entropy"}],
                       data=data, train={"max_steps": 3, "progress": False, "out_dir": str(tmp_path / "teacher")})
    path = tmp_path / "teacher.yaml"
    path.write_text(yaml.safe_dump(teacher_cfg))
    # The module entry point, as `python -m rcfast.cli` (the console script calls the same main()).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "rcfast.cli", "consolidate", "--config", str(path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["steps"] == 3

    # student.init_from: the student's backbone starts as the teacher's (its classifier dropped)
    init_cfg = dict(common, student=dict(common["student"], heads={"other": 4},
                                         init_from=str(tmp_path / "teacher" / "final.pt")),
                    tasks=teacher_cfg["tasks"], data=data, objective=[{"term": "cross_entropy", "head": "other",
                                                                      "data": "colours"}],
                    train={"max_steps": 1, "progress": False, "out_dir": str(tmp_path / "init")})
    initialised = Consolidator.from_config(config_from_dict(init_cfg))
    teacher_state = torch.load(tmp_path / "teacher" / "final.pt", weights_only=True)["model"]
    for key, value in initialised.student.backbone.state_dict().items():
        assert torch.equal(value, teacher_state["backbone." + key]), key
    assert initialised.student.head_names == ("other",)

    student_cfg = dict(common, teachers=[{"name": "colours", "builder": "small_cnn", "num_classes": 3,
                                          "builder_kwargs": {"width": 4},
                                          "checkpoint": str(tmp_path / "teacher" / "final.pt")}],
                       data=dict(data, source=str(proxy)), objective=[{"term": "multihead_kd"}],
                       train={"max_steps": 3, "progress": False, "out_dir": str(tmp_path / "student")})
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(student_cfg))
    assert cli.main(["consolidate", "--config", str(path)]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "student" / "final.pt"), "--data", str(task),
                     "--knn-k", "3", "--data-backend", "pil", "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"linear_probe", "linear_probe_C", "knn@3"}
    assert 0.0 <= result["linear_probe"] <= 1.0
    assert json.loads((tmp_path / "eval.json").read_text()) == result
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "nope.pt"), "--data", str(task)]) == 2


def test_an_old_form_config_is_a_one_line_error_saying_how_to_write_it(tmp_path, capsys):
    data = _minimal(tmp_path, temperature=2.0)
    del data["objective"]
    data["train"]["mode"] = "distill"
    assert cli.main(["consolidate", "--config", str(_write(tmp_path, data))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rcfast: error: ") and err.count("\n") == 1, err
    assert "old form (train.mode, teachers[0].temperature)" in err
    assert err.rstrip().endswith("write instead: objective: [{term: multihead_kd, temperature: 2.0}]"), err


def test_bench_without_the_script_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "BENCH_SCRIPT", tmp_path / "bench" / "bench_kd_loss.py")
    assert cli.main(["bench"]) == 2
    assert "source checkout" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_quick_writes_report_chart_and_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    models = {"random_init", "teacher_generalist", "teacher_task_a", "teacher_task_b", "single_kd_a", "repcon",
              "multi_kd_no_generalist", "oracle_multitask"}
    assert set(results["transfer"]) == models
    for per_task in results["transfer"].values():
        assert set(per_task) == {"parity", "loops", "inverted_tinted"}
        assert all(0.0 <= r["linear_probe"] <= 1.0 for r in per_task.values())
    assert "(b) RepCon" in printed and "train img/s" in printed
    assert (out / "report.md").read_text().startswith("# rcfast demo")
    assert (out / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every run went through a YAML config that `rcfast consolidate` accepts
    assert load_config(out / "configs" / "repcon.yaml").teachers[2].generalist


# ---------------------------------------------------------------------------------------------------------------
# Every config field has a valid range, refused with the key named (issue 8, item 13).

@pytest.mark.parametrize("section,key,value,message", [
    ("optim", "clip_grad_norm", -1.0, r"optim.clip_grad_norm must be a finite number > 0, or null"),
    ("optim", "clip_grad_norm", 0.0, r"optim.clip_grad_norm must be a finite number > 0"),
    ("optim", "min_lr_ratio", -3.0, r"optim.min_lr_ratio must be in \[0, 1\]"),
    ("optim", "min_lr_ratio", 1.5, r"optim.min_lr_ratio must be in \[0, 1\]"),
    ("optim", "weight_decay", -0.1, r"optim.weight_decay must be a finite number >= 0"),
    ("optim", "lr", float("inf"), r"optim.lr must be a finite number > 0, got inf"),
    ("optim", "lr", float("nan"), r"optim.lr must be a finite number > 0, got nan"),
    ("optim", "lr", 0.0, r"optim.lr must be a finite number > 0"),
    ("optim", "lr", 10 ** 400, r"optim.lr must be a number of float range"),
    ("optim", "momentum", 1.0, r"optim.momentum must be in \[0, 1\)"),
    ("optim", "betas", [0.9, 1.5], r"optim.betas must be two numbers in \[0, 1\)"),
    ("optim", "betas", [0.9], r"optim.betas must be two numbers"),
    ("optim", "warmup_steps", -1, r"optim.warmup_steps must be >= 0"),
    ("optim", "name", "adagrad", r"optim.name must be one of"),
    ("train", "num_threads", 0, r"train.num_threads must be in \[1, 1024\]"),
    ("train", "max_steps", 0, r"train.max_steps must be >= 1"),
    ("train", "log_every", 0, r"train.log_every must be >= 1"),
    ("train", "checkpoint_every", -2, r"train.checkpoint_every must be >= 0"),
    ("train", "keep_checkpoints", 0, r"train.keep_checkpoints must be >= 1"),
    ("train", "seed", -1, r"train.seed must be in \[0, 2\*\*63 - 1\]"),
    ("train", "seed", 2 ** 64, r"train.seed must be in"),
    ("train", "dist_timeout_s", 0.0, r"train.dist_timeout_s must be a finite number of seconds >= 1"),
    ("train", "dist_timeout_s", 0.001, r"train.dist_timeout_s must be a finite number of seconds >= 1"),
    ("train", "num_threads", 10**6, r"train.num_threads must be in \[1, 1024\]"),
    ("train", "out_dir", "runs/a\x00b", r"train.out_dir contains a NUL character"),
    ("train", "dist_timeout_s", float("inf"), r"train.dist_timeout_s must be a finite"),
    ("train", "device", "gpu0", r"train.device must be 'auto' or a torch device"),
    ("train", "loss_backend", "fast", r"train.loss_backend must be one of"),
    ("train", "dist_backend", "mpi", r"train.dist_backend must be one of"),
    ("train", "out_dir", "", r"train.out_dir must be a folder path"),
    ("data", "batch_size", 0, r"data.batch_size must be > 0"),
    ("data", "image_size", 0, r"data.image_size must be in \[1, 4096\]"),
    ("data", "image_size", 100_000, r"data.image_size must be in \[1, 4096\]"),
    ("data", "num_threads", 100_000, r"data.num_threads must be in \[0, 1024\]"),
    ("data", "num_threads", -1, r"data.num_threads must be in \[0, 1024\]"),
    ("data", "backend", "opencv", r"data.backend must be one of"),
    ("data", "augment", "mixup", r"data.augment must be one of"),
    ("student", "backbone_kwargs", {"1bad": 2}, r"student.backbone_kwargs: keyword names must be identifiers"),
    ("student", "heads", {"a": -5}, r"student.heads.a must be a positive number of classes"),
])
def test_meaningless_values_are_refused_naming_the_key(tmp_path, section, key, value, message):
    data = _minimal(tmp_path)
    data.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


@pytest.mark.parametrize("patch,message", [
    ({"objective": [{"term": "multihead_kd", "weight": -1.0}]}, r"objective\[0\].weight must be a finite number >= 0"),
    ({"objective": [{"term": "multihead_kd", "head_weights": -0.5}]}, r"head_weights must be >= 0"),
    ({"objective": [{"term": "multihead_kd", "head_weights": {"a": -2.0}}]}, r"head_weights\['a'\] must be >= 0"),
    ({"objective": [{"term": "multihead_kd", "temperature": 0.0}]}, r"temperature must be > 0"),
])
def test_negative_term_weights_are_refused(tmp_path, patch, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(dict(_minimal(tmp_path), **patch))


def test_a_batch_larger_than_the_data_set_is_refused_before_training(tmp_path, capsys):
    config = tiny_run(tmp_path)
    config["data"]["batch_size"] = 64  # 16 images, drop_last
    path = write_config(tmp_path / "run.yaml", config)
    assert cli.main(["consolidate", "--config", str(path)]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert "data.batch_size=64 is larger than the 16 images data.source gives this process" in error, error
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert cli.main(["consolidate", "--config", str(path), "--set", "data.drop_last=false",
                     "--set", "train.max_steps=1"]) == 0


def test_a_diverging_run_is_a_one_line_error_and_writes_no_model(tmp_path, capsys):
    config = tiny_run(tmp_path, steps=4, checkpoint_every=2)
    config["optim"].update(lr=1e30, clip_grad_norm=None)
    config["train"]["log_every"] = 4
    path = write_config(tmp_path / "run.yaml", config)
    assert cli.main(["consolidate", "--config", str(path)]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert error.startswith("rcfast: error: training diverged: ") and "no checkpoint was written before" in error
    run = tmp_path / "run"
    assert not (run / "final.pt").exists() and not list((run / "checkpoints").glob("*.pt"))


# ---------------------------------------------------------------------------------------------------------------
# Hostile inputs: one `rcfast: error: ...` line each, never a traceback (issue 8, item 16).

BOMB = "".join(f"{n}: &{n} [{', '.join(['*' + p] * 10 if p else ['1'] * 10)}]\n"
               for n, p in zip("abcdefghi", [None] + list("abcdefgh"))) + "student: {backbone_kwargs: {x: *i}}\n"


@pytest.mark.parametrize("name,content,message", [
    ("png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "is not a UTF-8 text file (byte 0 is 0x89)"),
    ("list", b"- train\n- data\n", "must be a mapping (key: value lines) at the top level, got a list"),
    ("scalar", b"42\n", "got a int"),
    ("bomb", BOMB.encode(), "holds more than 50000 values once its YAML aliases are expanded"),
    ("recursive", b"student: &s {backbone_kwargs: {x: *s}}\n", "refers to itself"),
    ("deep", b"x: " + b"[" * 100000 + b"]" * 100000, "nests more than 64 levels deep"),
    ("huge", b"# " + b"x" * (300 << 10), "is larger than 256 KiB"),
    ("tab", b"train:\n\tmax_steps: 3\n", "is not valid YAML"),
    ("python-tag", b"train: !!python/object/apply:os.system ['true']\n", "is not valid YAML"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 12 else None)
def test_hostile_config_files(tmp_path, capsys, name, content, message):
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content)
    assert cli.main(["consolidate", "--config", str(path)]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert message in error, error


@pytest.mark.parametrize("target,message", [
    ("directory", "is a directory, not a YAML file"),
    ("/dev/zero", "is larger than 256 KiB"),
    ("missing", "does not exist"),
])
def test_config_paths_that_are_not_files(tmp_path, capsys, target, message):
    path = {"directory": str(tmp_path), "/dev/zero": "/dev/zero", "missing": str(tmp_path / "nope.yaml")}[target]
    assert cli.main(["consolidate", "--config", path]) == 2
    assert message in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("override,message", [
    ("train..max_steps=1", "a key path is dot-separated names"),
    ("=3", "a key path is dot-separated names"),
    ("train.max_steps.x=1", "cannot index into a int"),
    ("teachers.x.name=a", "'x' is not an index of a list of 1 entries"),
    ("teachers.-1.name=a", "'-1' is not an index"),
    ("nothing", "--set expects key=value"),
    ("train=5", "train must be a mapping, got int"),
    ("train.max_steps=[[[[", "is not valid YAML"),
    ("student.backbone_kwargs=&a [*a]", "refers to itself"),
])
def test_bad_overrides(tmp_path, capsys, override, message):
    path = _write(tmp_path, _minimal(tmp_path))
    assert cli.main(["consolidate", "--config", str(path), "--set", override]) == 2
    assert message in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("case,message", [
    ("empty path", r"teachers\[0\].checkpoint must be set"),
    ("directory", r"teacher 'a': checkpoint .* is a directory, not a checkpoint file"),
    ("empty file", r"teacher 'a': checkpoint .*empty\.pt is empty \(0 bytes\)"),
    ("truncated", r"teacher 'a': checkpoint .*cut\.pt is not a loadable weights-only checkpoint: truncated"),
])
def test_unusable_teacher_paths(tmp_path, capsys, case, message):
    _teacher_checkpoint(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "a.pt").read_bytes()[:3000])
    (tmp_path / "folder.pt").mkdir()
    checkpoint = {"empty path": "", "directory": str(tmp_path / "folder.pt"), "empty file": str(tmp_path / "empty.pt"),
                  "truncated": str(tmp_path / "cut.pt")}[case]
    path = _write(tmp_path, _minimal(tmp_path, checkpoint=checkpoint))
    assert cli.main(["consolidate", "--config", str(path)]) == 2
    assert re.search(message, one_line_error(capsys.readouterr().err))


def test_a_model_too_large_for_the_machine_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    def too_large(*args, **kwargs):  # what torch raises when an allocation fails (not tried for real here)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 512000000000 bytes.")
    monkeypatch.setattr("rcfast.train.consolidator.build_student", too_large)
    path = write_config(tmp_path / "run.yaml", tiny_run(tmp_path))
    assert cli.main(["consolidate", "--config", str(path)]) == 2
    assert "can't allocate memory" in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("case,message", [
    ("width", r"student: cannot build backbone 'small_cnn' with backbone_kwargs \{'width': 0.5\}"),
    ("norm", r"student: cannot build backbone 'small_cnn' with .*norm must be one of"),
    ("binary source", r"data.source: source .*teacher\.pt. is a file but not a UTF-8 text list of image paths"),
    ("out_dir is a file", r"^rcfast: error: train.out_dir: cannot write to .*000\.png"),
])
def test_values_only_the_builders_can_judge_are_still_named(tmp_path, capsys, case, message):
    config = tiny_run(tmp_path)
    if case == "width":
        config["student"]["backbone_kwargs"]["width"] = 0.5
    elif case == "norm":
        config["student"]["backbone_kwargs"]["norm"] = "layer"
    elif case == "binary source":
        config["data"]["source"] = config["teachers"][0]["checkpoint"]
    else:
        config["train"]["out_dir"] = str(tmp_path / "proxy" / "000.png")
    assert cli.main(["consolidate", "--config", str(write_config(tmp_path / "run.yaml", config))]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert re.search(message, error), error


def _unwritable_dir(tmp_path: Path) -> Path | None:
    """A folder this process cannot create files in (read-only for non-root users, /sys for root)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    if not os.access(folder, os.W_OK):
        return folder / "out"
    candidate = Path("/sys/rcfast-test-out")
    try:
        candidate.mkdir()
    except OSError:
        return candidate
    candidate.rmdir()
    return None


def test_an_unwritable_out_dir_is_refused_before_anything_loads(tmp_path, capsys):
    out = _unwritable_dir(tmp_path)
    if out is None:
        pytest.skip("no unwritable folder here (running as root on a writable /sys?)")
    config = tiny_run(tmp_path)
    config["train"]["out_dir"] = str(out)
    config["teachers"][0]["checkpoint"] = str(tmp_path / "missing.pt")  # reached only if out_dir passed
    assert cli.main(["consolidate", "--config", str(write_config(tmp_path / "run.yaml", config))]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert f"train.out_dir: cannot write to {out}" in error, error
    config["train"]["out_dir"] = str(tmp_path / "run.yaml" / "out")  # a path through a file
    assert cli.main(["consolidate", "--config", str(write_config(tmp_path / "run2.yaml", config))]) == 2
    assert "train.out_dir: cannot write to" in one_line_error(capsys.readouterr().err)


def test_too_little_disk_for_the_checkpoints_is_refused_before_teachers_load(tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    loaded = []
    monkeypatch.setattr("rcfast.train.consolidator.load_teacher", lambda *a, **k: loaded.append(a))
    config = tiny_run(tmp_path)
    assert cli.main(["consolidate", "--config", str(write_config(tmp_path / "run.yaml", config))]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert re.search(r"train.out_dir: .*run has 0.0 MiB free, but this run's checkpoints need about", error), error
    assert loaded == []


@pytest.mark.slow
def test_a_checkpoint_write_that_fails_mid_run_is_a_one_line_error(tmp_path):
    """A file system that refuses the write (here: a 60 kB file-size limit, EFBIG) after the run started."""
    import resource
    import signal

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    config = tiny_run(tmp_path, steps=3, checkpoint_every=1)
    result = run_cli("consolidate", "--config", str(write_config(tmp_path / "run.yaml", config)),
                     preexec_fn=limit_file_size)
    assert result.returncode == 2, result.stdout
    error = one_line_error(result.stderr)
    assert "cannot write" in error and "checkpoint_000000001.pt" in error and "File too large" in error, error
    assert not list((tmp_path / "run" / "checkpoints").glob("*.pt"))  # no torn file under the real name


# ---------------------------------------------------------------------------------------------------------------
# A missing extra is named in the first second, before any work (issue 9, item 6): `pip install -e .` then
# `rcfast demo` trained every model for two minutes and died with "No module named 'matplotlib'".

def _without(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where ``block(*modules)`` makes modules unimportable (not installed)."""
    prelude = ("import importlib.abc, sys\nBLOCKED = set()\n"
               "class Blocker(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path, target=None):\n"
               "        if name.split('.')[0] in BLOCKED:\n"
               "            raise ModuleNotFoundError(f'No module named {name!r} (blocked by the test)', name=name)\n"
               "sys.meta_path.insert(0, Blocker())\n"
               "def block(*modules):\n    BLOCKED.clear(); BLOCKED.update(modules)\n")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


COMMANDS_WITHOUT_AN_EXTRA = [  # (blocked module, argv, error, extra)
    ("matplotlib", ["demo", "--quick", "--out", "{tmp}/demo"], "rcfast demo needs matplotlib", "train"),
    ("yaml", ["consolidate", "--config", "{tmp}/run.yaml"], "rcfast consolidate needs PyYAML", "train"),
    ("PIL", ["consolidate", "--config", "{tmp}/run.yaml"], "rcfast consolidate needs pillow", "data"),
    ("sklearn", ["eval", "--checkpoint", "{tmp}/final.pt", "--data", "{tmp}/task"], "rcfast eval needs scikit-learn",
     "train"),
]


@pytest.mark.slow
def test_a_command_missing_an_extra_names_it_before_doing_anything(tmp_path):
    write_config(tmp_path / "run.yaml", tiny_run(tmp_path))
    calls = [(blocked, [a.format(tmp=tmp_path) for a in argv]) for blocked, argv, _, _ in COMMANDS_WITHOUT_AN_EXTRA]
    result = _without(
        "import contextlib, io, json\nfrom rcfast.cli import main\nout = []\n"
        f"for blocked, argv in {calls!r}:\n"
        "    block(blocked)\n    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n        status = main(argv)\n"
        "    out.append([status, err.getvalue()])\n"
        "print(json.dumps(out))\n")
    assert result.returncode == 0, result.stderr[-3000:]
    for (blocked, _, message, extra), (status, stderr) in zip(COMMANDS_WITHOUT_AN_EXTRA, json.loads(result.stdout)):
        assert status == 2, (blocked, stderr)
        error = one_line_error(stderr)
        assert error.startswith(f"rcfast: error: {message}") and f"pip install 'rcfast[{extra}]'" in error, error
    # nothing was started: no demo folder, no run folder
    assert not (tmp_path / "demo").exists() and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_importing_a_subpackage_without_its_extra_names_the_extra():
    cases = [("rcfast.train", "tqdm", "train"), ("rcfast.data", "PIL", "data"), ("rcfast.eval", "sklearn", "train")]
    result = _without(
        "import importlib\n"
        f"for package, blocked, _ in {cases!r}:\n"
        "    block(blocked)\n"
        "    try:\n        importlib.import_module(package)\n"
        "    except ImportError as exc:\n        print(type(exc).__name__, exc)\n"
        "    else:\n        print('imported', package)\n")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    for line, (package, _, extra) in zip(lines, cases):
        assert line.startswith(f"MissingExtraError {package} needs") and f"pip install 'rcfast[{extra}]'" in line


def test_every_subcommand_declares_the_extras_it_needs():
    """A new subcommand must add its line to COMMAND_NEEDS, or a missing extra surfaces mid-run."""
    from rcfast.cli import COMMAND_NEEDS, COMMANDS, build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(COMMANDS) == set(COMMAND_NEEDS)


def test_main_gives_the_warning_format_back_to_its_caller(capsys):
    import warnings

    before = warnings.formatwarning
    assert cli.main(["rank-teachers", "--repo", "/nonexistent-repo", "--target", "/nonexistent-target"]) == 2
    assert warnings.formatwarning is before
    assert capsys.readouterr().err.startswith("rcfast: error:")
