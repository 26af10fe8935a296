"""IE-KD and mutual learning through ``rcfast consolidate``: configs end to end, bad configs, exact resume.

Tiny runs (16x16 images, width-4 CNNs, a few steps) on PNG folders written here:
a ``factor_reconstruction`` run pretrains the teacher's auto-encoder, an IE-KD
run (cross-entropy + KD + inheritance + exploration) reads it, and a mutual
learning run trains a peer with the student. Resume: a run is continued from
its step-2 checkpoint and must end bitwise equal to the uninterrupted run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rcfast.models import build_classifier
from rcfast.train import Consolidator
from rcfast.train.config import ConfigError, config_from_dict
from rcfast.train.objectives import Objective

from helpers.consolidate_runs import (assert_resumes_exactly, checkpoint, consolidate, metrics,  # noqa: F401
                                      restore_global_rng, write_class_images)

pytestmark = pytest.mark.usefixtures("one_thread", "restore_global_rng")

LAYER = "backbone.body.13"  # small_cnn's last activation: [B, 4 * width, S / 4, S / 4]
WIDTH = 4
CLASSES = 3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Labeled images and a (random, sharpened) teacher checkpoint, shared by the module's tests."""
    root = tmp_path_factory.mktemp("iekd_runs")
    write_class_images(root / "images", CLASSES)
    gen_state = torch.get_rng_state()
    torch.manual_seed(0)
    teacher = build_classifier("small_cnn", CLASSES, width=2 * WIDTH)
    torch.set_rng_state(gen_state)
    with torch.no_grad():
        teacher.heads.weight.mul_(10.0)
    torch.save(teacher.state_dict(), root / "teacher.pt")
    return root


def base_config(root: Path, out: Path, objective: list, steps: int = 4, **train) -> dict:
    return {
        "student": {"backbone": "small_cnn", "backbone_kwargs": {"width": WIDTH}, "heads": {"digits": CLASSES}},
        "teachers": [{"name": "teacher", "builder": "small_cnn", "num_classes": CLASSES,
                      "builder_kwargs": {"width": 2 * WIDTH}, "checkpoint": str(root / "teacher.pt")}],
        "data": {"source": str(root / "images"), "labels": True, "image_size": 16, "batch_size": 6,
                 "augment": "none", "shuffle": True, "backend": "pil", "num_threads": 0},
        "objective": objective,
        "optim": {"lr": 0.01, "warmup_steps": 1},
        "train": {"max_steps": steps, "progress": False, "out_dir": str(out), "log_every": 1,
                  "checkpoint_every": 2, "keep_checkpoints": 5, **train},
    }


@pytest.fixture(scope="module")
def teacher_autoencoder(workspace, tmp_path_factory):
    """A factor_reconstruction run: the teacher's auto-encoder, pretrained."""
    out = workspace / "teacher_ae"
    config = base_config(workspace, out, [{"term": "factor_reconstruction", "layer": LAYER, "factor_channels": 4}],
                         steps=6)
    assert consolidate(config, workspace / "teacher_ae.yaml") == 0
    return out


def iekd_objective(autoencoder: Path, exploration: str = "cka", **extra) -> list:
    common = {"autoencoder": str(autoencoder), "student_layer": LAYER, "split": "random", "seed": 3, **extra}
    return [{"term": "cross_entropy"},
            {"term": "multihead_kd", "heads": {"digits": "teacher"}, "weight": 0.5},
            {"term": "iekd_inherit", **common, "warmup_steps": 3},
            {"term": "iekd_explore", **common, "exploration": exploration, "weight": 0.5}]


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_factor_reconstruction_run_trains_the_teacher_autoencoder(teacher_autoencoder):
    records = metrics(teacher_autoencoder)
    assert [r["step"] for r in records] == list(range(1, 7))
    losses = [r["terms"]["factor_reconstruction"] for r in records]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    state = checkpoint(teacher_autoencoder, 6)["objective"]
    assert any(k.startswith("terms.factor_reconstruction.autoencoder.encoder.") for k in state)


@pytest.mark.slow
@pytest.mark.parametrize("exploration", ["l1", "cos", "cka"])
def test_iekd_run_end_to_end_and_exact_resume(workspace, teacher_autoencoder, tmp_path, exploration):
    out = tmp_path / "iekd"
    config = base_config(workspace, out, iekd_objective(teacher_autoencoder, exploration))
    assert consolidate(config, tmp_path / "iekd.yaml") == 0
    records = metrics(out)
    assert set(records[-1]["terms"]) == {"cross_entropy", "multihead_kd", "iekd_inherit", "iekd_explore"}
    assert all(np.isfinite(v) for r in records for v in r["terms"].values())
    # warm-up of the inheritance weight: 1/3, 2/3, then full (logged as parts while it ramps)
    assert [r["parts"]["iekd_inherit"]["warmup"] for r in records[:2]] == pytest.approx([1 / 3, 2 / 3])
    assert records[0]["terms"]["iekd_inherit"] == pytest.approx(
        records[0]["parts"]["iekd_inherit"]["before_warmup"] / 3, rel=1e-5)
    assert "iekd_inherit" not in records[-1].get("parts", {})

    state = checkpoint(out, 4)["objective"]
    teacher_ae = checkpoint(teacher_autoencoder, 6)["objective"]
    for key, value in teacher_ae.items():  # the teacher's auto-encoder is frozen: loaded, then never changed
        mine = key.replace("terms.factor_reconstruction.autoencoder.", "terms.iekd_inherit.teacher_autoencoder.")
        assert torch.equal(state[mine], value), mine
    inherit, explore = state["terms.iekd_inherit.split.inherit_index"], state["terms.iekd_explore.split.explore_index"]
    assert sorted(torch.cat([inherit, explore]).tolist()) == list(range(4 * WIDTH))  # one random split, two halves
    assert_resumes_exactly(config, out, tmp_path / "resume.yaml")


@pytest.mark.slow
def test_mutual_learning_with_and_without_iekd_end_to_end_and_exact_resume(workspace, tmp_path):
    peer = {"term": "mutual_learning", "peer_backbone": "small_cnn", "peer_backbone_kwargs": {"width": WIDTH},
            "temperature": 2.0}
    plain_out = tmp_path / "dml"
    plain = base_config(workspace, plain_out, [{"term": "cross_entropy"}, peer], steps=3)
    plain["teachers"] = []
    assert consolidate(plain, tmp_path / "dml.yaml") == 0
    assert set(metrics(plain_out)[-1]["parts"]["mutual_learning"]) == {"kl_student", "ce_peer", "kl_peer"}
    # DML is symmetric: had the peer started as a copy of the student, they would still be equal
    final = checkpoint(plain_out, 3)
    peer_head = final["objective"]["terms.mutual_learning.peer.heads.weight"]
    assert not torch.equal(peer_head, final["model"]["heads.weight"])

    out = tmp_path / "ie_dml"
    with_iekd = dict(peer, iekd={"student_layer": LAYER, "peer_layer": "backbone.body.13", "factor_channels": 4,
                                 "exploration": "cos", "split": "random", "warmup_steps": 2})
    config = base_config(workspace, out, [{"term": "cross_entropy"}, with_iekd])
    config["teachers"] = []
    assert consolidate(config, tmp_path / "ie_dml.yaml") == 0
    records = metrics(out)
    parts = records[-1]["parts"]["mutual_learning"]
    assert set(parts) == {"kl_student", "ce_peer", "kl_peer", "reconstruction", "inherit_student",
                          "explore_student", "inherit_peer", "explore_peer"}
    assert all(np.isfinite(v) for v in parts.values())
    state = checkpoint(out, 4)["objective"]
    assert "terms.mutual_learning.peer.heads.weight" in state
    assert "terms.mutual_learning.peer_iekd.split.inherit_index" in state
    assert_resumes_exactly(config, out, tmp_path / "resume.yaml")


# ----------------------------------------------------------------------------- bad configs
def trainer_error(config: dict) -> str:
    with pytest.raises(ConfigError) as info:
        Consolidator.from_config(config_from_dict(config))
    return str(info.value)


@pytest.mark.slow
def test_unknown_feature_layer_lists_the_valid_names(workspace, teacher_autoencoder, tmp_path):
    objective = iekd_objective(teacher_autoencoder)
    objective[2]["student_layer"] = "backbone.layer4"
    message = trainer_error(base_config(workspace, tmp_path / "x", objective))
    assert "the student has no layer 'backbone.layer4'" in message
    assert "Valid layer names" in message and "backbone.body.13" in message

    peer = {"term": "mutual_learning", "peer_backbone": "small_cnn", "peer_backbone_kwargs": {"width": WIDTH},
            "iekd": {"student_layer": LAYER, "peer_layer": "body.99", "factor_channels": 4}}
    config = base_config(workspace, tmp_path / "y", [{"term": "cross_entropy"}, peer])
    config["teachers"] = []
    with pytest.raises(ValueError, match=r"the peer has no layer 'body.99'.*Valid layer names"):
        Consolidator.from_config(config_from_dict(config))


@pytest.mark.slow
def test_factor_shapes_that_differ_are_refused(workspace, teacher_autoencoder, tmp_path):
    objective = iekd_objective(teacher_autoencoder)
    for entry in objective[2:]:
        entry["student_layer"] = "backbone.body.2"  # full resolution, the teacher's factor is 4x4
    assert "factor shapes differ" in trainer_error(base_config(workspace, tmp_path / "x", objective))


@pytest.mark.slow
def test_inherit_and_explore_must_split_alike(workspace, teacher_autoencoder, tmp_path):
    objective = iekd_objective(teacher_autoencoder)
    objective[3]["seed"] = 4
    message = trainer_error(base_config(workspace, tmp_path / "x", objective))
    assert "give both terms the same split" in message and "'iekd_inherit'" in message


@pytest.mark.slow
def test_autoencoder_of_another_teacher_layer_is_refused(workspace, teacher_autoencoder, tmp_path):
    objective = iekd_objective(teacher_autoencoder)
    objective[2]["teacher_layer"] = "backbone.body.10"
    assert "was trained on 'backbone.body.13', not 'backbone.body.10'" in trainer_error(
        base_config(workspace, tmp_path / "x", objective))


@pytest.mark.parametrize("patch, message", [
    ({"exploration": "l2"}, r"exploration must be one of \('l1', 'cos', 'cka'\)"),
    ({"warmup_steps": -1}, "warmup_steps must be an int >= 0"),
    ({"student_layer": ""}, "student_layer must be a non-empty string"),
    ({"split": "relation"}, r"split must be one of \('natural', 'random'\)"),
    ({"inherit_channels": 0}, "inherit_channels must be a positive int"),
])
def test_bad_iekd_options_are_config_errors(tmp_path, patch, message):
    entry = {"term": "iekd_explore", "autoencoder": str(tmp_path), "student_layer": LAYER, **patch}
    with pytest.raises(ConfigError, match=message):
        Objective.from_specs([entry])


def test_missing_autoencoder_run_is_a_clear_error(workspace, tmp_path, capsys):
    objective = [{"term": "cross_entropy"},
                 {"term": "iekd_inherit", "autoencoder": str(tmp_path / "nowhere"), "student_layer": LAYER}]
    assert consolidate(base_config(workspace, tmp_path / "x", objective), tmp_path / "x.yaml") == 2
    assert "autoencoder: " in capsys.readouterr().err


@pytest.mark.parametrize("iekd, message", [
    ({"student_layer": LAYER, "peer_layer": LAYER}, r"missing \['factor_channels'\]"),
    ({"student_layer": LAYER, "peer_layer": LAYER, "factor_channels": 4, "kind": "l1"}, r"unknown options \['kind'\]"),
    ({"student_layer": LAYER, "peer_layer": LAYER, "factor_channels": 4, "exploration": "dot"},
     "iekd.exploration must be one of"),
])
def test_bad_mutual_learning_options(iekd, message):
    with pytest.raises(ConfigError, match=message):
        Objective.from_specs([{"term": "mutual_learning", "peer_backbone": "small_cnn", "iekd": iekd}])


@pytest.mark.slow
def test_iekd_with_another_student_architecture(workspace, teacher_autoencoder, tmp_path):
    """Layers by name: a ResNet student (``backbone.layers.5``, 4x4 at 16 px) against the small CNN teacher."""
    objective = iekd_objective(teacher_autoencoder, "l1")
    for entry in objective[2:]:
        entry["student_layer"] = "backbone.layers.5"
    out = tmp_path / "resnet"
    config = base_config(workspace, out, objective, steps=2)
    config["student"] = {"backbone": "resnet18", "backbone_kwargs": {"width": 2}, "heads": {"digits": CLASSES}}
    assert consolidate(config, tmp_path / "resnet.yaml") == 0
    state = checkpoint(out, 2)["objective"]
    assert state["terms.iekd_inherit.split.inherit_index"].numel() == 4  # 8 channels at that stage, split 4 / 4
    assert all(np.isfinite(v) for v in metrics(out)[-1]["terms"].values())
