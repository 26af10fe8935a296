"""Configs (YAML <-> dataclasses), clear errors for bad configs, and the ``rcfast`` command end to end."""
from __future__ import annotations

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
    ("not weights", r"teacher 'a': .*not a loadable weights-only checkpoint"),
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
