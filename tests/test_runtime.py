"""Run-wide process settings live in rcfast.train.runtime; library code leaves the process as it found it."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from helpers import TensorProxy, toy_images
from rcfast.eval.finetune import finetune_accuracy
from rcfast.models import build_classifier, build_model, build_student
from rcfast.train import Consolidator, OptimConfig, TrainConfig
from rcfast.train.runtime import RuntimeSettings, apply_runtime, check_runtime, process_state


@pytest.fixture
def restore_process():
    """Undo whatever a test applies on purpose (threads, determinism, seeds, env)."""
    import os
    before = process_state()
    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    yield
    torch.set_num_threads(before["num_threads"])
    torch.use_deterministic_algorithms(before["deterministic"], warn_only=before["deterministic_warn_only"])
    torch.backends.cudnn.benchmark = before["cudnn_benchmark"]
    if env is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = env
    random.setstate(rng[0])
    np.random.set_state(rng[1])
    torch.set_rng_state(rng[2])


def _models():
    """Student, teacher and data, built by the test (building modules draws from the global RNG)."""
    images, labels = toy_images(32, 3, image_size=16, seed=1)
    return (build_student("small_cnn", {"task": 3}, width=4), build_classifier("small_cnn", 3, width=4),
            TensorProxy(images, labels, batch_size=8, labels=True))


def _run(tmp_path, models=None, **train_kwargs) -> Consolidator:
    student, teacher, data = models or _models()
    train = TrainConfig(max_steps=2, out_dir=str(tmp_path / "run"), resume="none", progress=False, log_every=1,
                        checkpoint_every=1, **train_kwargs)
    return Consolidator(student, [{"term": "multihead_kd"}, {"term": "cross_entropy", "weight": 0.5}], data,
                        teachers={"task": teacher}, train=train, optim=OptimConfig(lr=1e-2))


def _seed_caller() -> None:
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)


def test_constructing_and_fitting_a_consolidator_leaves_the_process_as_it_was(tmp_path):
    models = _models()
    _seed_caller()
    before = process_state()
    trainer = _run(tmp_path, models, seed=5)
    assert process_state() == before
    trainer.fit()
    assert process_state() == before
    # so the caller's random streams continue exactly where they were
    draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
    _seed_caller()
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == draws


def test_from_config_and_finetune_leave_the_process_as_it_was(tmp_path):
    from rcfast.train import RunConfig, TaskConfig
    from rcfast.train.config import DataConfig

    folder = tmp_path / "task"
    from PIL import Image
    for c in range(2):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 60 * c + i, dtype=np.uint8)).save(folder / f"c{c}" / f"{i}.png")
    config = RunConfig(tasks=[TaskConfig("t", str(folder), 2)], objective=[{"term": "cross_entropy"}],
                       data=DataConfig(image_size=8, batch_size=4, augment="none", backend="pil", num_threads=0),
                       train=TrainConfig(max_steps=1, out_dir=str(tmp_path / "out"), progress=False, seed=3))
    config.student.backbone_kwargs = {"width": 4}
    images, labels = toy_images(16, 2, image_size=8)
    batches = [(images[:8], labels[:8]), (images[8:], labels[8:])]
    backbone = build_model("small_cnn", width=4)
    torch.manual_seed(1)
    before = process_state()
    trainer = Consolidator.from_config(config)
    assert process_state() == before
    trainer.fit()
    assert process_state() == before
    # eval's fine-tune seeds its own head, not the caller's RNG
    finetune_accuracy(backbone, batches, batches, num_classes=2, epochs=1, seed=9)
    assert process_state() == before


def test_the_trainer_checks_but_does_not_apply_run_wide_settings(tmp_path, restore_process):
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match=rf"train.num_threads is {threads + 1} but this process runs {threads} "
                                         r"torch threads: apply it with rcfast.train.runtime.apply_runtime"):
        _run(tmp_path, num_threads=threads + 1)
    if not torch.are_deterministic_algorithms_enabled():
        with pytest.raises(ValueError, match="train.deterministic is true but torch's deterministic algorithms"):
            _run(tmp_path, deterministic=True)
    assert torch.get_num_threads() == threads
    # applied by the process owner (the CLI), the same settings are accepted
    train = TrainConfig(num_threads=1, deterministic=True, seed=4)
    apply_runtime(train)
    assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.benchmark
    import os
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"]
    check_runtime(train, torch.device("cpu"))
    _run(tmp_path, num_threads=1, deterministic=True).fit()


def test_apply_runtime_seeds_the_global_rngs(restore_process):
    apply_runtime(RuntimeSettings(seed=21))
    first = (random.random(), float(np.random.rand()), float(torch.rand(())))
    apply_runtime(RuntimeSettings(seed=21))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first
    with pytest.raises(ValueError, match="train.num_threads must be > 0"):
        apply_runtime(RuntimeSettings(num_threads=0))
