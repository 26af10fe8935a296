"""The ``ot_distill`` objective term: ``rcfast consolidate`` distils a teacher into a student
head over a different label space; its options are checked before training."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers.proxy import TensorProxy, toy_images
from PIL import Image

from rcfast import cli
from rcfast.data import ProxyImages
from rcfast.eval import classifier_accuracy
from rcfast.models import build_classifier, build_student
from rcfast.select import class_cost_matrix
from rcfast.train import ConfigError, Consolidator, OptimConfig, TrainConfig, load_config
from rcfast.train.config import TeacherConfig
from rcfast.train.teachers import load_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

# Six colours; the teacher tells all six apart, the target task merges colour k and k + 3.
COLOURS = np.array([[230, 30, 30], [30, 200, 30], [30, 30, 230], [230, 230, 30], [30, 220, 220], [220, 30, 220]])
DATA = {"image_size": 12, "batch_size": 16, "augment": "none", "backend": "pil", "num_threads": 0}


def colour_folders(root: Path, per_class: int, seed: int, classes_of=lambda colour: colour) -> Path:
    rng = np.random.default_rng(seed)
    for colour, rgb in enumerate(COLOURS):
        folder = root / f"class_{classes_of(colour)}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rgb + rng.normal(0, 30, size=(12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{colour}_{i:03d}.png")
    return root


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_consolidate_distils_a_teacher_into_a_head_with_other_classes(tmp_path, capsys):
    teacher_data = colour_folders(tmp_path / "colours6", per_class=12, seed=0)
    target_train = colour_folders(tmp_path / "target" / "train", per_class=6, seed=1, classes_of=lambda k: k % 3)
    target_test = colour_folders(tmp_path / "target" / "test", per_class=10, seed=2, classes_of=lambda k: k % 3)
    common = {"student": {"backbone": "small_cnn", "backbone_kwargs": {"width": 4}}, "optim": {"lr": 0.01}}

    teacher_run = dict(common, tasks=[{"name": "colours6", "source": str(teacher_data), "num_classes": 6}],
                       data=dict(DATA, shuffle=True), objective=[{"term": "cross_entropy"}],
                       train={"max_steps": 60, "progress": False, "out_dir": str(tmp_path / "teacher")})
    assert cli.main(["consolidate", "--config", str(write_config(tmp_path / "teacher.yaml", teacher_run))]) == 0
    teacher_cfg = TeacherConfig(name="colours6", builder="small_cnn", num_classes=6, builder_kwargs={"width": 4},
                                checkpoint=str(tmp_path / "teacher" / "final.pt"))

    # The cost between the teacher's six classes and the target's three, from the labeled target sample.
    labeled = ProxyImages(str(target_train), labels=True, shuffle=False, drop_last=False, device="cpu", **DATA)
    cost = class_cost_matrix(load_teacher(teacher_cfg), labeled)
    assert cost.shape == (6, 3)
    torch.save(cost, tmp_path / "cost.pt")

    student_run = dict(common, student=dict(common["student"], heads={"target": 3}),
                       teachers=[{"name": "colours6", "builder": "small_cnn", "num_classes": 6,
                                  "builder_kwargs": {"width": 4}, "checkpoint": teacher_cfg.checkpoint}],
                       data=dict(DATA, source=str(teacher_data), shuffle=True),  # unlabeled proxy images
                       objective=[{"term": "ot_distill", "cost": str(tmp_path / "cost.pt"), "eps": 0.05}],
                       train={"max_steps": 60, "progress": False, "log_every": 10,
                              "out_dir": str(tmp_path / "student")})
    capsys.readouterr()
    assert cli.main(["consolidate", "--config", str(write_config(tmp_path / "student.yaml", student_run))]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    ot_values = [m["terms"]["ot_distill"] for m in metrics if "terms" in m]
    assert ot_values and ot_values[-1] < ot_values[0]

    student = build_student("small_cnn", {"target": 3}, width=4)
    student.load_state_dict(torch.load(tmp_path / "student" / "final.pt", weights_only=True)["model"])
    test = ProxyImages(str(target_test), labels=True, shuffle=False, drop_last=False, device="cpu", **DATA)
    # Never trained on a target label: what it knows of the three classes came through the transport.
    assert classifier_accuracy(student, test) > 0.8


def test_options_are_checked_when_the_config_is_loaded(tmp_path):
    torch.save(build_classifier("small_cnn", 6, width=4).state_dict(), tmp_path / "t.pt")
    (tmp_path / "proxy").mkdir()

    def config(**term):
        return write_config(tmp_path / "run.yaml", {
            "student": {"backbone_kwargs": {"width": 4}, "heads": {"target": 3}},
            "teachers": [{"name": "t", "builder": "small_cnn", "num_classes": 6, "checkpoint": str(tmp_path / "t.pt"),
                          "builder_kwargs": {"width": 4}}],
            "data": {"source": str(tmp_path / "proxy"), "image_size": 12, "batch_size": 4},
            "objective": [dict({"term": "ot_distill"}, **term)],
            "train": {"max_steps": 1, "out_dir": str(tmp_path / "out"), "progress": False}})

    torch.save(torch.rand(6, 3), tmp_path / "good.pt")
    assert load_config(config(cost=str(tmp_path / "good.pt"))).objective[0]["term"] == "ot_distill"
    assert load_config(config(cost=torch.rand(6, 3).tolist(), temperature=2.0, eps=0.1))
    torch.save(torch.rand(3, 6), tmp_path / "transposed.pt")
    with pytest.raises(ConfigError, match=r"objective term 'ot_distill'.*cost is \[3, 6\].*\[C_teacher, C_head\] = "
                                          r"\[6, 3\]"):
        load_config(config(cost=str(tmp_path / "transposed.pt")))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config(cost=str(tmp_path / "missing.pt")))
    # A pickle that would run code when unpickled: refused by weights_only loading, never run.
    torch.save({"cost": torch.rand(6, 3), "hook": print}, tmp_path / "code.pt")
    with pytest.raises(ConfigError, match="not a loadable weights-only tensor file"):
        load_config(config(cost=str(tmp_path / "code.pt")))
    with pytest.raises(ConfigError, match="cost must be finite"):
        load_config(config(cost=[[float("nan")] * 3] * 6))
    with pytest.raises(ConfigError, match="eps must be"):
        load_config(config(cost=str(tmp_path / "good.pt"), eps=0))
    with pytest.raises(ConfigError, match="there is no teacher 'nope'"):
        load_config(config(cost=str(tmp_path / "good.pt"), teacher="nope"))


def test_beside_cross_entropy_from_python_with_a_tensor_cost(tmp_path):
    """ot_distill on the proxy images next to cross_entropy on a labeled task, one run."""
    torch.manual_seed(0)
    teacher = build_classifier("small_cnn", 5, width=4)
    student = build_student("small_cnn", {"target": 3}, width=4)
    images, _ = toy_images(32, 5, image_size=12, seed=1)
    task_images, task_labels = toy_images(24, 3, image_size=12, seed=2)
    data = {"proxy": TensorProxy(images, batch_size=8, seed=3),
            "target": TensorProxy(task_images, task_labels, batch_size=8, seed=4, labels=True)}
    objective = [{"term": "ot_distill", "cost": torch.rand(5, 3), "teacher": "t", "weight": 0.5},
                 {"term": "cross_entropy", "head": "target", "data": "target"}]
    train = TrainConfig(max_steps=3, out_dir=str(tmp_path / "run"), progress=False, log_every=1,
                        checkpoint_every=0, num_threads=1)
    trainer = Consolidator(student, objective, data, teachers={"t": teacher}, train=train, optim=OptimConfig(lr=0.01),
                           example_images=torch.zeros(2, 3, 12, 12))
    before = [p.detach().clone() for p in student.parameters()]
    try:
        trainer.fit()
    finally:
        trainer.close()
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    terms = [m["terms"] for m in logged if "terms" in m]
    assert terms and all(set(t) == {"ot_distill", "cross_entropy"} and np.isfinite(list(t.values())).all()
                         for t in terms)
