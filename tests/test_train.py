"""The Consolidator on tiny in-memory data: steps, learning, AMP, teachers, optimiser, checkpoints."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from helpers import TensorProxy, toy_images
from rcfast.models import build_classifier, build_student
from rcfast.train import Consolidator, OnlineTeachers, OptimConfig, TrainConfig, atomic_save, read_metrics
from rcfast.train.teachers import TeacherRequest
from rcfast.train.checkpoint import capture_rng_state, latest_checkpoint, load_checkpoint, restore_rng_state
from rcfast.train.errors import DivergenceError
from rcfast.train.optim import build_optimizer, warmup_cosine


# Tiny models run fastest (and reproducibly) on one thread (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _teachers(seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    teachers = {"task": build_classifier("small_cnn", 3, width=4), "generalist": build_classifier("small_cnn", 6, width=4)}
    with torch.no_grad():  # sharper random teachers: a clear target
        for t in teachers.values():
            t.heads.weight.mul_(20.0)
    return teachers


def _distiller(tmp_path, steps: int = 4, precision: str = "fp32", lr: float = 3e-3, teacher_source: bool = False,
               **train_kwargs) -> Consolidator:
    images, _ = toy_images(48, 6, image_size=16, seed=1)
    torch.manual_seed(0)
    student = build_student("small_cnn", {"task": 3, "generalist": 6}, width=4)
    train_kwargs.setdefault("log_every", 1)
    train = TrainConfig(max_steps=steps, out_dir=str(tmp_path / "run"), resume="none", progress=False,
                        precision=precision, **train_kwargs)
    objective = [{"term": "multihead_kd", "temperature": {"task": 2.0, "generalist": 4.0}}]
    teachers = _teachers()
    if teacher_source:  # what from_config passes: a TeacherSource with the configured class counts
        teachers = OnlineTeachers(teachers, num_classes={"task": 3, "generalist": 6})
    return Consolidator(student, objective, TensorProxy(images, batch_size=16), teachers=teachers, train=train,
                        optim=OptimConfig(lr=lr, warmup_steps=0))


def test_one_step_updates_the_student_and_logs(tmp_path):
    trainer = _distiller(tmp_path, steps=1)
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    summary = trainer.fit()
    assert summary["steps"] == 1 and math.isfinite(summary["loss"]) and summary["loss"] > 0
    changed = [k for k, v in trainer.student.state_dict().items() if not torch.equal(v, before[k])]
    assert "heads.weight" in changed and "backbone.body.0.weight" in changed
    (record,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert record["step"] == 1 and record["terms"] == {"multihead_kd": record["loss"]}
    assert set(record["parts"]["multihead_kd"]) == {"task", "generalist"}
    assert record["images_per_sec"] > 0 and record["lr"] == pytest.approx(3e-3 * warmup_cosine(1, 0, 1, 0.0))
    # the per-head losses add up to the fused loss
    assert sum(record["parts"]["multihead_kd"].values()) == pytest.approx(record["loss"], rel=1e-4)
    final = torch.load(tmp_path / "run" / "final.pt", weights_only=True)
    assert final["heads"] == {"names": ["task", "generalist"], "splits": [3, 6]}
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "checkpoint_000000001.pt"


def test_distillation_loss_decreases(tmp_path):
    trainer = _distiller(tmp_path, steps=24, lr=1e-2)
    trainer.fit()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 24
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses


def test_supervised_multitask_loss_decreases(tmp_path):
    xa, ya = toy_images(48, 3, image_size=16, seed=2)
    xb, yb = toy_images(48, 4, image_size=16, seed=3)
    torch.manual_seed(0)
    student = build_student("small_cnn", {"a": 3, "b": 4}, width=4)
    # Each head trained with cross-entropy on its own labeled task stream (the "oracle").
    trainer = Consolidator(
        student, [{"term": "cross_entropy", "head": "a"}, {"term": "cross_entropy", "head": "b", "weight": 2.0}],
        {"a": TensorProxy(xa, ya, batch_size=12, labels=True), "b": TensorProxy(xb, yb, batch_size=12, labels=True)},
        train=TrainConfig(max_steps=24, out_dir=str(tmp_path / "sup"), resume="none", progress=False, log_every=1),
        optim=OptimConfig(lr=1e-2))
    trainer.fit()
    records = read_metrics(tmp_path / "sup" / "metrics.jsonl")
    first, last = records[0], records[-1]
    assert set(first["terms"]) == {"cross_entropy:a", "cross_entropy:b"} and "parts" not in first
    assert first["terms"]["cross_entropy:a"] == pytest.approx(math.log(3), rel=0.3)  # ~uniform at the start
    assert first["loss"] == pytest.approx(first["terms"]["cross_entropy:a"] + 2.0 * first["terms"]["cross_entropy:b"],
                                          rel=1e-6)
    assert last["loss"] < 0.5 * first["loss"], [r["loss"] for r in records]
    assert first["epoch"] == {"a": 0, "b": 0} and trainer.inputs.student_streams == ["a", "b"]


@pytest.mark.parametrize("teachers_as", ["modules", "teacher-source"])
def test_bf16_autocast_on_cpu(tmp_path, teachers_as):
    trainer = _distiller(tmp_path, steps=2, precision="bf16",
                         teacher_source=teachers_as == "teacher-source")
    seen, teacher_seen = [], []
    trainer.student.heads.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    for teacher in trainer.teachers.models.values():  # teachers run in the run's precision too
        teacher.heads.register_forward_hook(lambda m, i, o: teacher_seen.append(o.dtype))
    summary = trainer.fit()
    assert seen and all(dtype == torch.bfloat16 for dtype in seen)
    assert len(teacher_seen) == 4 and all(dtype == torch.bfloat16 for dtype in teacher_seen)
    assert math.isfinite(summary["loss"])
    assert all(p.dtype == torch.float32 for p in trainer.student.parameters())  # master weights stay fp32
    assert not trainer.scaler.is_enabled()  # bf16 needs no loss scaling


def test_fp16_without_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 is valid with a GPU")
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        _distiller(tmp_path, precision="fp16")


def test_hard_label_cross_entropy_term(tmp_path):
    images, labels = toy_images(48, 3, image_size=16, seed=4)
    torch.manual_seed(0)
    student = build_student("small_cnn", {"task": 3, "generalist": 6}, width=4)
    train = TrainConfig(max_steps=2, out_dir=str(tmp_path / "ce"), resume="none", progress=False, log_every=1)
    objective = [{"term": "multihead_kd"}, {"term": "cross_entropy", "head": "task", "weight": 0.5}]
    trainer = Consolidator(student, objective, TensorProxy(images, labels, batch_size=16, labels=True),
                           teachers=_teachers(), train=train)
    trainer.fit()
    rec1, _ = read_metrics(tmp_path / "ce" / "metrics.jsonl")
    # total = KD + 0.5 * CE (~log 3 for an untrained head), each logged under its name
    assert rec1["terms"]["cross_entropy"] == pytest.approx(math.log(3), rel=0.5)
    assert rec1["loss"] == pytest.approx(rec1["terms"]["multihead_kd"] + 0.5 * rec1["terms"]["cross_entropy"],
                                         rel=1e-6)
    assert sum(rec1["parts"]["multihead_kd"].values()) == pytest.approx(rec1["terms"]["multihead_kd"], rel=1e-4)


def test_online_teachers_pack_logits_into_one_reused_buffer():
    teachers = _teachers()
    source = OnlineTeachers(teachers)
    assert source.num_classes == {"task": 3, "generalist": 6}  # read from each model's last Linear
    images = torch.randn(5, 3, 16, 16)

    def request(x, stream="proxy"):
        return TeacherRequest(stream=stream, step=0, images=x, teachers=("generalist", "task"))

    packed = source(request(images)).logits
    with torch.no_grad():
        expected = torch.cat([teachers["generalist"](images), teachers["task"](images)], dim=1)
    torch.testing.assert_close(packed, expected)
    assert not packed.requires_grad and not packed.is_inference()
    again = source(request(torch.randn(5, 3, 16, 16))).logits
    assert again.data_ptr() == packed.data_ptr()  # no new allocation per step
    # another stream's logits live in the same step: their own buffer
    assert source(request(images, stream="task_b")).logits.data_ptr() != packed.data_ptr()
    with pytest.raises(ValueError, match="num_classes names"):
        OnlineTeachers(teachers, num_classes={"task": 3})
    wrong = OnlineTeachers(teachers, num_classes={"task": 4, "generalist": 6})
    with pytest.raises(ValueError, match=r"teacher 'task' produced logits of shape \(5, 3\), expected \[5, 4\]"):
        wrong(request(images))


def test_fused_optimizer_on_cpu_and_no_decay_for_1d_params():
    student = build_student("small_cnn", {"a": 2}, width=4)
    optimizer = build_optimizer(student, OptimConfig(name="adamw", weight_decay=0.1), torch.device("cpu"))
    assert optimizer.defaults["fused"] is True
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    with pytest.raises((ValueError, ImportError), match="lamb"):
        build_optimizer(student, OptimConfig(name="lamb"), torch.device("cpu"))


def test_warmup_then_cosine_schedule():
    values = [warmup_cosine(s, warmup_steps=4, total_steps=12, min_ratio=0.1) for s in range(13)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0 and values[12] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))  # monotone decay after warm-up


def test_atomic_save_and_weights_only_rng_round_trip(tmp_path):
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    state = capture_rng_state()
    path = atomic_save({"rng": state, "x": torch.arange(3)}, tmp_path / "ck" / "a.pt")
    assert [p.name for p in path.parent.iterdir()] == ["a.pt"]  # no temp file left behind
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    loaded = torch.load(path, weights_only=True)
    restore_rng_state(loaded["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_resume_rejects_a_checkpoint_of_another_student(tmp_path):
    trainer = _distiller(tmp_path, steps=2)
    trainer.fit()
    torch.manual_seed(0)
    other = build_student("small_cnn", {"task": 3, "other": 6}, width=4)
    images, _ = toy_images(48, 6, image_size=16, seed=1)
    resumed = Consolidator(other, [{"term": "multihead_kd", "heads": {"task": "task", "other": "generalist"}}],
                           TensorProxy(images, batch_size=16), teachers=_teachers(),
                           train=TrainConfig(max_steps=4, out_dir=str(tmp_path / "run"), progress=False))
    with pytest.raises(ValueError, match="checkpoint heads"):
        resumed.fit()


def test_metrics_jsonl_lines_are_json(tmp_path):
    trainer = _distiller(tmp_path, steps=3)
    trainer.fit()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_a_dataset_sharded_for_another_rank_is_rejected(tmp_path):
    from rcfast.train import DistContext
    images, _ = toy_images(16, 2, image_size=8)
    with pytest.raises(ValueError, match="shard 0 of 1, but this process is rank 1 of 2"):
        Consolidator(build_student("small_cnn", {"task": 3, "generalist": 6}, width=4),
                     [{"term": "multihead_kd"}], TensorProxy(images, batch_size=4), teachers=_teachers(),
                     train=TrainConfig(out_dir=str(tmp_path)), dist_context=DistContext(rank=1, world_size=2))


# ---------------------------------------------------------------------------------------------------------------
# Divergence: nothing non-finite is ever written; the run stops with the last good checkpoint kept (item 14).

def _poison(step: int, how: str):
    """A callback that makes the run diverge after ``step``: an infinite LR, or NaN in a weight."""
    def callback(trainer: Consolidator) -> None:
        if trainer.step != step:
            return
        if how == "lr":
            for group in trainer.optimizer.param_groups:
                group["lr"] = float("inf")
        else:
            with torch.no_grad():
                trainer.student.heads.weight[0, 0] = float("nan")
    return callback


@pytest.mark.parametrize("how,first_bad", [("lr", None), ("nan-weight", 6)])
def test_divergence_writes_nothing_non_finite_and_keeps_the_last_good_checkpoint(tmp_path, how, first_bad):
    """The original failure: with log_every=8, checkpoint_every=2 an infinite LR for one step exited 0 with every
    kept checkpoint and final.pt full of NaN weights."""
    trainer = _distiller(tmp_path, steps=10, log_every=8, checkpoint_every=2, keep_checkpoints=10)
    trainer.add_callback(_poison(5 if how == "nan-weight" else 3, how))
    with pytest.raises(DivergenceError) as info:
        trainer.fit()
    message = str(info.value)
    run = tmp_path / "run"
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    good = ["checkpoint_000000002.pt"] + (["checkpoint_000000004.pt"] if how == "nan-weight" else [])
    assert kept == good  # the step-4 (lr) or step-6 (NaN) checkpoint was never written
    assert not (run / "final.pt").exists()
    assert f"the last good checkpoint is {run / 'checkpoints' / good[-1]}" in message
    assert "weight/optimiser tensors hold NaN or inf" in message and "--allow-config-change" in message
    if first_bad:
        assert f"the loss was not finite at step {first_bad}" in message
    for name in kept:
        state = load_checkpoint(run / "checkpoints" / name)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not (run / "metrics.jsonl").exists()  # step 8 was never reached and logged


def test_a_non_finite_loss_between_logging_steps_is_reported_at_the_next_log(tmp_path):
    trainer = _distiller(tmp_path, steps=6, log_every=3)
    trainer.add_callback(_poison(1, "nan-weight"))  # the loss of step 2 is NaN
    with pytest.raises(DivergenceError,
                       match=r"the loss was not finite at step 2.*before writing the metrics of step 3"):
        trainer.fit()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # a NaN record is not written either


def test_the_finite_flag_is_kept_on_the_device_and_costs_no_host_read(tmp_path, monkeypatch):
    trainer = _distiller(tmp_path, steps=4, log_every=100)
    trainer.train_step()
    reads = []
    for method in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        def counted(self, *args, _name=method, _original=getattr(torch.Tensor, method), **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, method, counted)
    trainer._note_loss(torch.tensor(1.5))
    trainer._note_loss(torch.tensor(float("inf")))  # step 1 still: the first non-finite step is the one remembered
    trainer.step = 2
    trainer._note_loss(torch.tensor(float("nan")))
    assert reads == []  # no value crossed to the host
    monkeypatch.undo()
    assert trainer._first_nonfinite.device == trainer.device and int(trainer._first_nonfinite) == 1


@pytest.mark.gpu
def test_no_host_sync_per_step_on_a_gpu(tmp_path):
    """Tracking divergence adds no host synchronisation to a training step (checked on logging/checkpoint steps)."""
    images, _ = toy_images(32, 6, image_size=16, seed=1)

    class OnDevice(TensorProxy):
        """Batches already on the GPU, yielded in order (no index transfer per batch)."""

        def __iter__(self):
            for start in range(self.consumed * self.batch_size, len(self) * self.batch_size, self.batch_size):
                self.consumed += 1
                yield self.images[start:start + self.batch_size]

    torch.manual_seed(0)
    student = build_student("small_cnn", {"task": 3, "generalist": 6}, width=4)
    trainer = Consolidator(student, [{"term": "multihead_kd"}], OnDevice(images.cuda(), batch_size=8),
                           teachers=_teachers(), optim=OptimConfig(lr=1e-3, clip_grad_norm=1.0),
                           # the reference loss: this test is about the loop, not a kernel's launch path
                           train=TrainConfig(max_steps=8, out_dir=str(tmp_path / "run"), device="cuda",
                                             progress=False, loss_backend="reference"))
    trainer.train_step()  # the first step initialises cuBLAS, the fused optimiser's state...
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer._note_loss(torch.full((), float("nan"), device="cuda"))
        for _ in range(2):
            trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with pytest.raises(DivergenceError, match="the loss was not finite at step 1"):
        trainer.check_finite("a test checkpoint")
