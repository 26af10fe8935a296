"""Objectives: the term registry, YAML specs, up-front input checks, hooks, heads apart from teachers,
terms with parameters, and inputs computed once per step."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers import TensorProxy, toy_images
from helpers.terms import RegressionProbe  # noqa: F401  (registers regression_probe)
from rcfast.models import build_classifier, build_student
from rcfast.ops.multihead_kd import multihead_kd_loss
from rcfast.train import (ConfigError, Consolidator, OnlineTeachers, OptimConfig, TrainConfig, config_from_dict,
                          read_metrics)
from rcfast.train.objectives import (Images, Labels, Objective, StepInputs, StudentLayer, StudentLogits,
                                     TeacherLayer, TeacherLogits, Term, available_terms, register_term)
from rcfast.train.step_inputs import select_columns

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _teachers(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    teachers = {"task": build_classifier("small_cnn", 3, width=4), "generalist": build_classifier("small_cnn", 6, width=4)}
    with torch.no_grad():
        for t in teachers.values():
            t.heads.weight.mul_(20.0)
    return teachers


def _trainer(tmp_path, objective, heads=None, data=None, steps: int = 2, teachers="default", **kwargs):
    images, labels = toy_images(32, 3, image_size=16, seed=1)
    torch.manual_seed(0)
    student = build_student("small_cnn", heads or {"task": 3, "generalist": 6}, width=4)
    data = data if data is not None else TensorProxy(images, labels, batch_size=8, labels=True)
    return Consolidator(student, objective, data, teachers=_teachers() if teachers == "default" else teachers,
                        train=TrainConfig(max_steps=steps, out_dir=str(tmp_path / "run"), resume="none",
                                          progress=False, log_every=1),
                        optim=OptimConfig(lr=1e-2, warmup_steps=0), **kwargs)


# --------------------------------------------------------------------------- registry and specs
def test_builtin_terms_are_registered_and_names_are_unique():
    assert {"multihead_kd", "cross_entropy"} <= set(available_terms())
    with pytest.raises(ValueError, match="already registered"):
        @register_term("multihead_kd")
        class Other(Term):
            pass
    with pytest.raises(TypeError, match="decorates Term subclasses"):
        register_term("not_a_term")(object)


@pytest.mark.parametrize("specs,message", [
    ([{"term": "no_such_term"}], r"unknown objective term 'no_such_term'; registered terms: \[.*'cross_entropy'"),
    ([{"term": "cross_entropy", "haed": "a"}], r"objective\[0\] \(cross_entropy\): unknown option 'haed'; "
                                                r"valid options: \['term', 'weight', 'name', 'head', 'data'"),
    ([{"weight": 1.0}], r"objective\[0\] needs term: <name>"),
    ([{"term": "multihead_kd", "weight": "big"}], r"objective\[0\]\.weight must be a finite number"),
    ([{"term": "multihead_kd", "temperature": -1.0}], r"objective\[0\] \(multihead_kd\): temperature must be > 0"),
    ([{"term": "multihead_kd"}, {"term": "multihead_kd"}], r"appears 2 times; give each entry a distinct name"),
    ([{"term": "cross_entropy", "head": "a"}, {"term": "cross_entropy", "head": "a"}],
     r"objective\[1\] and objective\[0\] are both named 'cross_entropy:a'"),
    ([], r"at least one term"),
    ({"term": "multihead_kd"}, r"objective must be a list of terms"),
])
def test_bad_objective_specs_are_named(specs, message):
    with pytest.raises(ConfigError, match=message):
        Objective.from_specs(specs)


def test_default_names_and_weights():
    objective = Objective.from_specs([{"term": "multihead_kd"}, {"term": "cross_entropy", "head": "a", "weight": 0.1},
                                      {"term": "cross_entropy", "head": "b"},
                                      {"term": "cross_entropy", "head": "b", "data": "x", "name": "ce_b_x"}])
    assert objective.names == ["multihead_kd", "cross_entropy:a", "cross_entropy:b", "ce_b_x"]
    assert objective.weights == {"multihead_kd": 1.0, "cross_entropy:a": 0.1, "cross_entropy:b": 1.0, "ce_b_x": 1.0}


# --------------------------------------------------------------------------- test terms shaped like the next methods
@register_term("test_union_distill")
class UnionDistill(Term):
    """DMC-shaped: one student head regresses two teachers' logits over the union of their classes."""

    def __init__(self, head: str, teachers: list):
        super().__init__()
        self.head, self.teacher_names = head, tuple(teachers)

    def bind(self, setup):
        if setup.heads[setup.head(self.head)] != sum(setup.teachers[t] for t in self.teacher_names):
            raise setup.error("head size must be the teachers' classes together")
        self.student = setup.need(StudentLogits("proxy", (self.head,)))
        self.target = setup.need(TeacherLogits("proxy", self.teacher_names))

    def forward(self, step):
        return F.mse_loss(step[self.student].float(), step[self.target].float())


@register_term("test_cross_space")
class CrossSpace(Term):
    """OT-shaped: a teacher over M classes against a student head over N != M classes."""

    def __init__(self, head: str, teacher: str):
        super().__init__()
        self.head, self.teacher = head, teacher

    def bind(self, setup):
        self.student = setup.need(StudentLogits("proxy", (setup.head(self.head),)))
        self.target = setup.need(TeacherLogits("proxy", (setup.teacher(self.teacher),)))

    def forward(self, step):
        s, t = step[self.student].float().softmax(1), step[self.target].float().softmax(1)
        return (s.mean(1) - t.mean(1)).pow(2).mean()


# --------------------------------------------------------------------------- configs: checked up front
def _config(tmp_path, **patch) -> dict:
    data = {"student": {"backbone_kwargs": {"width": 4}},
            "teachers": [{"name": "a", "builder": "small_cnn", "checkpoint": "a.pt", "num_classes": 5},
                         {"name": "g", "builder": "small_cnn", "checkpoint": "g.pt", "num_classes": 10}],
            "data": {"source": "proxy", "image_size": 16, "batch_size": 4},
            "objective": [{"term": "multihead_kd"}],
            "train": {"out_dir": str(tmp_path)}}
    for key, value in patch.items():
        data[key] = value
    return data


@pytest.mark.parametrize("patch,message", [
    # labels requested from a proxy stream without labels: named, before anything is built
    ({"objective": [{"term": "multihead_kd"}, {"term": "cross_entropy", "head": "a"}]},
     r"objective term 'cross_entropy': needs labels from the data stream 'proxy', which yields none "
     r"\(set data.labels: true\)"),
    ({"objective": [{"term": "multihead_kd", "heads": ["a", "x"]}]},
     r"objective term 'multihead_kd': heads: the student has no head 'x'; its heads: \['a', 'g'\]"),
    ({"student": {"heads": {"a": 5, "merged": 10}}, "objective": [{"term": "multihead_kd"}]},
     r"student head 'merged' is distilled from teacher 'merged', but the run's teachers are \['a', 'g'\]; "
     r"give heads: \{head: teacher\}"),
    ({"student": {"heads": {"a": 5, "g": 7}}},
     r"student head 'g' has 7 classes but teacher 'g' has 10"),
    ({"objective": [{"term": "multihead_kd", "heads": ["a"]}]},
     r"teacher 'g' is used by no objective term \(terms: \['multihead_kd'\]\)"),
    ({"objective": [{"term": "multihead_kd", "data": "task_x"}]}, r"data: there is no data stream 'task_x'"),
    ({"objective": [{"term": "multihead_kd", "temperature": {"a": 2.0}}]},
     r"temperature must give one value per distilled head \['a', 'g'\] \(missing \['g'\], unknown \[\]\)"),
    ({"objective": []}, r"objective must list at least one term"),
    ({"tasks": [{"name": "t", "source": "t", "num_classes": 3}]}, r"data stream 't' is used by no objective term"),
])
def test_config_objective_errors(tmp_path, patch, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(_config(tmp_path, **patch))


def test_valid_configs_of_the_new_methods_pass_the_config_check(tmp_path):
    # DMC: two teachers into one student head over the union of their classes (a term asking for both).
    config = config_from_dict(_config(tmp_path, student={"heads": {"merged": 15}}, objective=[
        {"term": "test_union_distill", "head": "merged", "teachers": ["a", "g"]}]))
    assert config.student_heads() == {"merged": 15}
    # The oracle: one cross_entropy per head, each on its own labeled task stream (the default).
    tasks = [{"name": "t1", "source": "t1", "num_classes": 3}, {"name": "t2", "source": "t2", "num_classes": 4}]
    config = config_from_dict(_config(tmp_path, teachers=[], data={"image_size": 16}, tasks=tasks,
                                      objective=[{"term": "cross_entropy", "head": "t1"},
                                                 {"term": "cross_entropy", "head": "t2"}]))
    assert config.student_heads() == {"t1": 3, "t2": 4}


@pytest.mark.parametrize("legacy,expected", [
    ({"train": {"mode": "distill", "ce_weight": 0.1, "ce_head": "a"},
      "teachers": [{"name": "a", "temperature": 2.0, "weight": 1.0}, {"name": "g", "temperature": 4.0}]},
     [{"term": "multihead_kd", "temperature": {"a": 2.0, "g": 4.0}},
      {"term": "cross_entropy", "head": "a", "weight": 0.1}]),
    ({"train": {"mode": "supervised"}, "tasks": [{"name": "t1", "weight": 2.0}, {"name": "t2"}]},
     [{"term": "cross_entropy", "head": "t1", "weight": 2.0}, {"term": "cross_entropy", "head": "t2"}]),
    ({"teachers": [{"name": "a", "weight": 0.5, "temperature": 4.0}]},
     [{"term": "multihead_kd", "temperature": 4.0, "head_weights": 0.5}]),
], ids=["distill+ce", "supervised", "teacher-weights"])
def test_old_form_configs_say_how_to_write_them_now(tmp_path, legacy, expected):
    data = _config(tmp_path)
    data.pop("objective")
    for key, value in legacy.items():
        if key == "teachers":
            data["teachers"] = [dict(base, **entry) for base, entry in zip(data["teachers"], value)]
        elif key == "tasks":
            data["tasks"] = [dict(entry, source="x", num_classes=3) for entry in value]
        else:
            data[key] = dict(data[key], **value)
    with pytest.raises(ConfigError, match="this config is in the old form") as info:
        config_from_dict(data)
    message = str(info.value)
    assert "\n" not in message  # the CLI prints it as one line
    suggested = yaml.safe_load(message.split("write instead: ", 1)[1])
    assert suggested == {"objective": expected}


# --------------------------------------------------------------------------- the step's inputs
@register_term("test_layer_user")
class LayerUser(Term):
    def __init__(self, layer: str, teacher: str | None = None):
        super().__init__()
        self.layer, self.teacher = layer, teacher

    def bind(self, setup):
        if self.teacher:
            setup.need(TeacherLayer("proxy", self.teacher, self.layer))
        else:
            setup.need(StudentLayer("proxy", self.layer))


@register_term("test_not_scalar")
class NotScalar(Term):
    def bind(self, setup):
        self.key = setup.need(StudentLogits("proxy", ("task",)))

    def forward(self, step):
        return step[self.key].sum(1)


def test_select_columns_views_when_contiguous_and_copies_otherwise():
    packed = torch.arange(2 * 9, dtype=torch.float32).reshape(2, 9)
    order, sizes = ["a", "b", "c"], {"a": 2, "b": 3, "c": 4}
    assert select_columns(packed, order, sizes, ["a", "b", "c"]) is packed
    bc = select_columns(packed, order, sizes, ["b", "c"])
    assert bc.data_ptr() == packed[:, 2:].data_ptr() and torch.equal(bc, packed[:, 2:])
    ca = select_columns(packed, order, sizes, ["c", "a"])
    assert torch.equal(ca, torch.cat([packed[:, 5:], packed[:, :2]], dim=1))


def test_undeclared_inputs_cannot_be_read():
    step = StepInputs(0, {Images("proxy"): torch.zeros(1)})
    assert step[Images("proxy")].shape == (1,)
    with pytest.raises(KeyError, match=r"Labels\(stream='proxy'\) was not declared by any objective term"):
        step[Labels("proxy")]


def _count_forwards(module) -> list:
    calls = []
    module.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    return calls


@register_term("test_inputs_recorder")
class InputsRecorder(Term):
    """Declares one of every input kind and keeps the step's values for the test to inspect."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def bind(self, setup):
        self.keys = [setup.need(k) for k in (
            Images("proxy"), Labels("proxy"), StudentLogits("proxy", ("generalist", "task")),
            StudentLayer("proxy", "backbone"), StudentLayer("proxy", "backbone.body.3"),
            TeacherLogits("proxy", ("generalist",)), TeacherLogits("proxy", ("task", "generalist")),
            TeacherLayer("proxy", "task", "backbone"))]

    def forward(self, step):
        self.seen.append({k: step[k].detach().clone() for k in self.keys})
        return step[self.keys[3]].float().pow(2).mean() * 0.0


def test_every_input_is_computed_once_per_step_and_matches_a_direct_computation(tmp_path):
    trainer = _trainer(tmp_path, [{"term": "multihead_kd"}, {"term": "cross_entropy", "head": "task"},
                                  {"term": "test_inputs_recorder"}], steps=1)
    student_calls = _count_forwards(trainer.student)
    teacher_calls = {n: _count_forwards(m) for n, m in trainer.teachers.models.items()}
    student_before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.fit()
    # one student forward for three terms, one forward per teacher (the shape probe ran at bind time)
    assert student_calls == [8] and teacher_calls == {"task": [8], "generalist": [8]}
    seen = trainer.objective.terms["test_inputs_recorder"].seen[0]
    images, labels = seen[Images("proxy")], seen[Labels("proxy")]
    assert images.shape == (8, 3, 16, 16) and labels.dtype == torch.int64
    teachers = {name: t.eval() for name, t in _teachers().items()}  # teachers run in eval()
    trainer.student.load_state_dict(student_before)
    trainer.student.train()
    with torch.no_grad():
        logits = trainer.student(images)
        features = trainer.student.backbone(images)
        layer3 = trainer.student.backbone.body[:4](images)
        t_task, t_gen = teachers["task"](images), teachers["generalist"](images)
    torch.testing.assert_close(seen[StudentLogits("proxy", ("generalist", "task"))],
                               torch.cat([logits[:, 3:], logits[:, :3]], dim=1))
    torch.testing.assert_close(seen[StudentLayer("proxy", "backbone")], features)
    torch.testing.assert_close(seen[StudentLayer("proxy", "backbone.body.3")], layer3)
    torch.testing.assert_close(seen[TeacherLogits("proxy", ("generalist",))], t_gen)
    torch.testing.assert_close(seen[TeacherLogits("proxy", ("task", "generalist"))], torch.cat([t_task, t_gen], 1))
    torch.testing.assert_close(seen[TeacherLayer("proxy", "task", "backbone")], teachers["task"].backbone(images))


def test_unknown_layer_names_list_the_valid_ones(tmp_path):
    kd = {"term": "multihead_kd"}
    with pytest.raises(ConfigError, match=r"objective term 'test_layer_user': the student has no layer "
                                          r"'backbone\.layer4'.*Valid layer names: \['backbone', 'backbone\.body'"):
        _trainer(tmp_path, [kd, {"term": "test_layer_user", "layer": "backbone.layer4"}])
    with pytest.raises(ConfigError, match=r"teacher 'task' has no layer 'backbone\.bod'; did you mean "
                                          r"\['backbone\.body'"):
        _trainer(tmp_path, [kd, {"term": "test_layer_user", "layer": "backbone.bod", "teacher": "task"}])


def test_labels_requested_from_unlabeled_data_fail_before_training(tmp_path):
    images, _ = toy_images(16, 3, image_size=16)
    with pytest.raises(ConfigError, match=r"'cross_entropy': needs labels from the data stream 'proxy'"):
        _trainer(tmp_path, [{"term": "multihead_kd"}, {"term": "cross_entropy", "head": "task"}],
                 data=TensorProxy(images, batch_size=8))


# --------------------------------------------------------------------------- heads apart from teachers
def test_student_heads_are_declared_apart_from_teachers(tmp_path):
    trainer = _trainer(tmp_path, [{"term": "test_union_distill", "head": "merged", "teachers": ["task", "generalist"]},
                                  {"term": "test_cross_space", "head": "target", "teacher": "generalist",
                                   "weight": 0.5}],
                       heads={"merged": 9, "target": 4}, steps=3)
    summary = trainer.fit()
    assert summary["steps"] == 3
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert set(record["terms"]) == {"test_union_distill", "test_cross_space"}
    assert record["loss"] == pytest.approx(record["terms"]["test_union_distill"] +
                                           0.5 * record["terms"]["test_cross_space"], rel=1e-6)


def test_multihead_kd_maps_heads_to_teachers_of_other_names(tmp_path):
    trainer = _trainer(tmp_path, [{"term": "multihead_kd", "heads": {"narrow": "task", "wide": "generalist"},
                                   "temperature": {"narrow": 2.0, "wide": 4.0}, "head_weights": 0.5}],
                       heads={"wide": 6, "narrow": 3}, steps=1)
    recorder = []
    trainer.add_callback(lambda t: recorder.append(t.step))
    trainer.fit()
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert set(record["parts"]["multihead_kd"]) == {"narrow", "wide"}
    assert sum(record["parts"]["multihead_kd"].values()) == pytest.approx(record["loss"], rel=1e-4)


# --------------------------------------------------------------------------- terms with parameters
def test_a_term_with_parameters_trains_and_is_checkpointed(tmp_path):
    objective = [{"term": "multihead_kd"}, {"term": "regression_probe", "teacher": "generalist", "weight": 0.5}]
    trainer = _trainer(tmp_path, objective, steps=3, example_images=torch.zeros(2, 3, 16, 16))
    probe = trainer.objective.terms["regression_probe"]
    assert probe.linear.in_features == 16 and probe.linear.out_features == 6  # measured by setup.probe
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in probe.parameters()} <= optimised
    before = probe.linear.weight.detach().clone()
    trainer.fit()
    assert not torch.equal(before, probe.linear.weight)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "checkpoint_000000003.pt", weights_only=True)
    assert torch.equal(checkpoint["objective"]["terms.regression_probe.linear.weight"], probe.linear.weight)
    # the same seed gives the same term parameters; a restored checkpoint gives the trained ones
    again = _trainer(tmp_path / "again", objective, steps=3, example_images=torch.zeros(2, 3, 16, 16))
    assert torch.equal(again.objective.terms["regression_probe"].linear.weight, before)
    again.load_state_dict(checkpoint)
    assert torch.equal(again.objective.terms["regression_probe"].linear.weight, probe.linear.weight)


def test_probing_without_example_images_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="needs example images to measure layer shapes: pass example_images="):
        _trainer(tmp_path, [{"term": "multihead_kd"}, {"term": "regression_probe", "teacher": "task"}])


def test_a_term_must_return_a_scalar(tmp_path):
    trainer = _trainer(tmp_path, [{"term": "multihead_kd"}, {"term": "test_not_scalar"}], steps=1)
    with pytest.raises(ValueError, match=r"'test_not_scalar' returned a tensor of shape \(8,\)"):
        trainer.fit()


def test_kd_term_equals_the_fused_loss_it_wraps(tmp_path):
    trainer = _trainer(tmp_path, [{"term": "multihead_kd", "temperature": {"task": 2.0, "generalist": 3.0},
                                   "head_weights": {"task": 1.0, "generalist": 0.25}}], steps=1)
    term = trainer.objective.terms["multihead_kd"]
    student, teacher = torch.randn(5, 9), torch.randn(5, 9)
    step = StepInputs(0, {term.student_key: student, term.teacher_key: teacher})
    expected = multihead_kd_loss(student, teacher, splits=[3, 6], temperature=[2.0, 3.0], weights=[1.0, 0.25],
                                 backend="reference")
    torch.testing.assert_close(term(step), expected)


# --------------------------------------------------------------------------- docs/extending.md
def test_the_extending_guide_examples_run(tmp_path):
    """Every Python block of docs/extending.md runs, and its example terms train."""
    text = (REPO / "docs" / "extending.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/extending.md has no python examples"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/extending.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert {"logit_mse", "feature_hint"} <= set(available_terms())
    trainer = _trainer(tmp_path, [{"term": "multihead_kd"},
                                  {"term": "logit_mse", "head": "task", "teacher": "task", "weight": 0.1},
                                  {"term": "feature_hint", "teacher": "generalist", "student_layer": "backbone.body.8",
                                   "teacher_layer": "backbone.body.8", "weight": 0.1}],
                       steps=2, example_images=torch.zeros(2, 3, 16, 16))
    trainer.fit()
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert set(record["terms"]) == {"multihead_kd", "logit_mse", "feature_hint"}
    assert all(v > 0 for v in record["terms"].values())


# --------------------------------------------------------------------------- the teacher source interface
class RecordingSource(OnlineTeachers):
    """Online teachers that record what the trainer asks for (as a cache would receive it)."""

    def __init__(self, teachers):
        super().__init__(teachers)
        self.requests = []

    def __call__(self, request):
        self.requests.append((request.stream, request.step, request.teachers, request.position))
        return super().__call__(request)


def test_a_teacher_source_gets_each_batch_position_once_per_step(tmp_path):
    source = RecordingSource(_teachers())
    images, labels = toy_images(24, 3, image_size=16, seed=1)  # 3 batches of 8 per epoch
    trainer = _trainer(tmp_path, [{"term": "multihead_kd"}], teachers=source, steps=4,
                       data=TensorProxy(images, labels, batch_size=8, labels=True))
    trainer.fit()
    assert source.requests == [("proxy", step, ("task", "generalist"), position)
                               for step, position in enumerate([(0, 0), (0, 1), (0, 2), (1, 0)])]


# --------------------------------------------------------------------------- multihead_kd with the head fused in
def _head_calls(trainer) -> list:
    """Count the student's packed-head forwards (a hook on ``heads``)."""
    calls = []
    trainer.student.heads.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    return calls


@pytest.mark.parametrize("extra_terms", [[], [{"term": "cross_entropy", "head": "task", "weight": 0.1}]],
                         ids=["kd-only", "with-a-logits-term"])
def test_fused_linear_kd_trains_as_the_unfused_term_without_making_logits(tmp_path, extra_terms):
    kd = {"term": "multihead_kd", "temperature": {"task": 2.0, "generalist": 3.0},
          "head_weights": {"task": 1.0, "generalist": 0.5}}
    runs = {}
    for fused in (False, True):
        trainer = _trainer(tmp_path / str(fused), [{**kd, "fused_linear": fused}] + extra_terms, steps=3)
        calls = _head_calls(trainer)
        trainer.fit()
        # Alone, the fused term makes no logits at all: the student's forward stops at the backbone.
        assert len(calls) == (0 if fused and not extra_terms else 3), calls
        runs[fused] = (trainer.student.state_dict(), read_metrics(tmp_path / str(fused) / "run" / "metrics.jsonl"))
    (plain, plain_log), (fused, fused_log) = runs[False], runs[True]
    # The same loss and the same updates, up to float32 rounding of the chunked GEMMs.
    for key, value in plain.items():
        torch.testing.assert_close(fused[key], value, rtol=1e-4, atol=1e-5, msg=key)
    for a, b in zip(plain_log, fused_log):
        assert b["terms"]["multihead_kd"] == pytest.approx(a["terms"]["multihead_kd"], rel=1e-4)
        for head in ("task", "generalist"):  # per-head parts are logged the same way
            assert b["parts"]["multihead_kd"][head] == pytest.approx(a["parts"]["multihead_kd"][head], rel=1e-4)


def test_fused_linear_kd_reads_the_rows_of_the_distilled_heads_only(tmp_path):
    # Heads in another order than the student's (a concatenation of the head's rows) and a subset.
    for heads in (["generalist", "task"], ["generalist"]):
        objective = [{"term": "multihead_kd", "heads": heads, "fused_linear": True, "name": "fused"}]
        if heads == ["generalist"]:  # every teacher must be used: the other one by a plain term
            objective.append({"term": "multihead_kd", "heads": ["task"], "name": "plain"})
        trainer = _trainer(tmp_path / "-".join(heads), objective, steps=1)
        term = trainer.objective.terms["fused"]
        step = trainer.inputs.compute({"proxy": next(iter(trainer.streams["proxy"].dataset))}, 0)
        features = step[term.features_key]
        weight, bias = step[term.student_key]
        rows = trainer.student.head_slices()
        expected_w = torch.cat([trainer.student.heads.weight[rows[h]] for h in heads])
        torch.testing.assert_close(weight, expected_w, rtol=0, atol=0)
        logits = features @ weight.T + bias
        expected = multihead_kd_loss(logits, step[term.teacher_key], splits=[trainer.student.splits[
            trainer.student.head_names.index(h)] for h in heads], temperature=4.0, backend="reference")
        torch.testing.assert_close(term(step), expected, rtol=1e-5, atol=1e-6)
        term(step).backward()  # gradients reach the student's packed head through the selection
        assert trainer.student.heads.weight.grad is not None and trainer.student.heads.weight.grad.abs().sum() > 0


def test_fused_linear_kd_under_bf16_autocast_takes_the_features_dtype(tmp_path):
    trainer = _trainer(tmp_path, [{"term": "multihead_kd", "fused_linear": True}], steps=2)
    trainer2 = _trainer(tmp_path / "b", [{"term": "multihead_kd"}], steps=2)
    for t in (trainer, trainer2):
        t.train_cfg.precision = "bf16"
        t.amp_dtype = torch.bfloat16
    loss_fused, _, _, step = trainer.train_step()
    loss_plain, *_ = trainer2.train_step()
    assert step[trainer.objective.terms["multihead_kd"].features_key].dtype == torch.bfloat16
    assert trainer.student.heads.weight.dtype == torch.float32 and trainer.student.heads.weight.grad.dtype == torch.float32
    # bf16 logits: agreement to bf16's precision
    assert loss_fused.item() == pytest.approx(loss_plain.item(), rel=2e-2)


def test_fused_linear_option_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"fused_linear must be true or false, got 'yes'"):
        Objective.from_specs([{"term": "multihead_kd", "fused_linear": "yes"}])
