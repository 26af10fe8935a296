"""DMC through ``rcfast consolidate``: two teachers with disjoint classes into one head, bad configs, exact resume."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rcfast.losses import double_distill_loss
from rcfast.models import build_classifier
from rcfast.train import Consolidator
from rcfast.train.config import ConfigError, config_from_dict

from helpers.consolidate_runs import (assert_resumes_exactly, checkpoint, consolidate, metrics,  # noqa: F401
                                      restore_global_rng, write_class_images)

pytestmark = pytest.mark.usefixtures("one_thread", "restore_global_rng")

WIDTH = 4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Unlabeled auxiliary images and an "old" (2 classes) and a "new" (2 classes) teacher."""
    root = tmp_path_factory.mktemp("dmc_runs")
    labeled = write_class_images(root / "labeled", classes=4)
    auxiliary = root / "auxiliary"
    auxiliary.mkdir()
    for i, png in enumerate(sorted(labeled.rglob("*.png"))):
        (auxiliary / f"{i:03d}.png").write_bytes(png.read_bytes())
    state = torch.get_rng_state()
    for seed, name in enumerate(("old", "new")):
        torch.manual_seed(seed)
        teacher = build_classifier("small_cnn", 2, width=WIDTH)
        with torch.no_grad():
            teacher.heads.weight.mul_(10.0)
        torch.save(teacher.state_dict(), root / f"{name}.pt")
    torch.set_rng_state(state)
    return root


def dmc_config(root: Path, out: Path, steps: int = 4, **term) -> dict:
    teachers = [{"name": name, "builder": "small_cnn", "num_classes": 2, "builder_kwargs": {"width": WIDTH},
                 "checkpoint": str(root / f"{name}.pt")} for name in ("old", "new")]
    return {
        "student": {"backbone": "small_cnn", "backbone_kwargs": {"width": WIDTH}, "heads": {"all": 4}},
        "teachers": teachers,
        "data": {"source": str(root / "auxiliary"), "image_size": 16, "batch_size": 8, "augment": "none",
                 "shuffle": True, "backend": "pil", "num_threads": 0},
        "objective": [{"term": "double_distill", **term}],
        "optim": {"lr": 0.01},
        "train": {"max_steps": steps, "progress": False, "out_dir": str(out), "log_every": 1,
                  "checkpoint_every": 2, "keep_checkpoints": 5},
    }


@pytest.mark.slow
def test_dmc_run_end_to_end_and_exact_resume(workspace, tmp_path):
    out = tmp_path / "dmc"
    config = dmc_config(workspace, out, steps=6, classes=[[0, 2], [3, 1]])
    assert consolidate(config, tmp_path / "dmc.yaml") == 0
    records = metrics(out)
    losses = [r["terms"]["double_distill"] for r in records]
    assert losses[-1] < losses[0]
    parts = records[-1]["parts"]["double_distill"]
    assert set(parts) == {"old", "new"}
    # the two teachers' columns are half each: their mean is the loss
    assert (parts["old"] + parts["new"]) / 2 == pytest.approx(records[-1]["terms"]["double_distill"], rel=1e-5)
    assert_resumes_exactly(config, out, tmp_path / "resume.yaml")


@pytest.mark.slow
def test_the_logged_loss_is_double_distillation_of_the_models(workspace, tmp_path):
    """Step 1's logged loss, recomputed from the initial student and the teachers on the same images."""
    out = tmp_path / "dmc"
    config = dmc_config(workspace, out, steps=1)
    config["data"]["shuffle"] = False
    config["data"]["batch_size"] = 32  # the whole auxiliary set in one batch: the order does not matter
    trainer = Consolidator.from_config(config_from_dict(config))
    initial_student = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.fit()
    trainer.close()
    logged = metrics(out)[0]["terms"]["double_distill"]

    from rcfast.data import ProxyImages
    images = next(iter(ProxyImages(str(workspace / "auxiliary"), image_size=16, batch_size=32, augment="none",
                                   shuffle=False, backend="pil", num_threads=0, device="cpu")))
    student = build_classifier("small_cnn", 4, width=WIDTH)
    student.load_state_dict(initial_student)
    teachers = []
    for name in ("old", "new"):
        teacher = build_classifier("small_cnn", 2, width=WIDTH)
        teacher.load_state_dict(torch.load(workspace / f"{name}.pt", weights_only=True))
        teachers.append(teacher.eval())
    student.train()
    with torch.no_grad():
        expected = double_distill_loss(student(images), [t(images) for t in teachers])
    assert logged == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("term, message", [
    ({"classes": [[0, 1], [1, 2]]}, r"declared disjoint, but class 1 belongs to teacher 0 and teacher 1"),
    ({"classes": [[0, 1], [2]]}, r"classes\[1\] lists 1 classes, but teacher 1 has 2"),
    ({"teachers": ["old"]}, r"head 'all' has 4 classes, but the teachers \['old'\] have \[2\] = 2"),
    ({"teachers": ["old", "newest"]}, r"there is no teacher 'newest'"),
    ({"head": "other"}, r"the student has no head 'other'"),
])
def test_bad_dmc_configs_are_config_errors(workspace, tmp_path, term, message):
    config = dmc_config(workspace, tmp_path / "x", **term)
    with pytest.raises(ConfigError, match=message) as info:
        config_from_dict(config).validate()
    assert "objective term 'double_distill'" in str(info.value)


def test_several_heads_need_the_head_named(workspace, tmp_path):
    config = dmc_config(workspace, tmp_path / "x")
    config["student"]["heads"] = {"all": 4, "extra": 2}
    with pytest.raises(ConfigError, match=r"the run has 2 heads .* say which one"):
        config_from_dict(config).validate()
