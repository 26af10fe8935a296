"""DMC's double-distillation loss against its formula, written here again in numpy.

``target = concat_k (t_k - t_k.mean(dim=1))`` (per sample, over each teacher's own
classes); ``loss = mean over batch and classes of (s - target)^2``.
"""
import numpy as np
import pytest
import torch

from rcfast.losses import DoubleDistillLoss, double_distill_loss
from rcfast.losses.dmc import double_distill_target

pytestmark = pytest.mark.usefixtures("one_thread")


def formula(student, teachers) -> float:
    target = np.concatenate([t - t.mean(axis=1, keepdims=True) for t in teachers], axis=1)
    return float(((student - target) ** 2).mean())


def _logits(batch, splits, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, sum(splits), generator=g, dtype=dtype)
    teachers = [3.0 * torch.randn(batch, c, generator=g, dtype=dtype) + 5.0 for c in splits]
    return student, teachers


@pytest.mark.parametrize("batch, splits", [(4, [3, 5]), (1, [1, 1]), (7, [10]), (3, [2, 4, 1]), (2, [1000, 7])])
def test_matches_formula_packed_and_listed(batch, splits):
    student, teachers = _logits(batch, splits)
    expected = formula(student.numpy(), [t.numpy() for t in teachers])
    packed = torch.cat(teachers, dim=1)
    assert double_distill_loss(student, teachers).item() == pytest.approx(expected, rel=1e-12)
    assert double_distill_loss(student, packed, splits=splits).item() == pytest.approx(expected, rel=1e-12)
    assert DoubleDistillLoss(splits)(student, packed).item() == pytest.approx(expected, rel=1e-12)


def test_one_teacher_without_splits_is_centred_over_all_columns():
    student, (teacher,) = _logits(5, [6], seed=1)
    assert double_distill_loss(student, teacher).item() == pytest.approx(
        formula(student.numpy(), [teacher.numpy()]), rel=1e-12)


def test_centring_is_per_sample_over_each_teachers_classes():
    """A per-sample offset added to one teacher changes nothing; a per-class (batch) offset does.

    That is the difference to the re-implementation that centres over the batch.
    """
    student, teachers = _logits(6, [4, 3], seed=2)
    base = double_distill_loss(student, teachers).item()
    per_sample = torch.randn(6, 1, dtype=torch.float64) * 10
    assert double_distill_loss(student, [teachers[0] + per_sample, teachers[1]]).item() == pytest.approx(base)
    per_class = torch.randn(1, 4, dtype=torch.float64) * 10
    assert double_distill_loss(student, [teachers[0] + per_class, teachers[1]]).item() != pytest.approx(base)
    target = double_distill_target(teachers)
    assert torch.allclose(target[:, :4].sum(1), torch.zeros(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(target[:, 4:].sum(1), torch.zeros(6, dtype=torch.float64), atol=1e-12)


def test_classes_place_each_teacher_at_its_student_columns():
    student, teachers = _logits(3, [2, 3], seed=3)
    classes = [[4, 0], [1, 3, 2]]  # teacher 0 owns global classes 4 and 0, teacher 1 owns 1, 3, 2
    in_order = double_distill_target(teachers)
    placed = double_distill_target(teachers, classes=classes)
    for k, ids in enumerate(classes):
        offset = [0, 2][k]
        for j, column in enumerate(ids):
            assert torch.equal(placed[:, column], in_order[:, offset + j])
    permuted_student = torch.empty_like(student)
    permuted_student[:, [4, 0, 1, 3, 2]] = student
    assert double_distill_loss(permuted_student, teachers, classes=classes).item() == pytest.approx(
        double_distill_loss(student, teachers).item(), rel=1e-12)
    assert DoubleDistillLoss([2, 3], classes)(permuted_student, torch.cat(teachers, 1)).item() == pytest.approx(
        double_distill_loss(student, teachers).item(), rel=1e-12)


def test_gradient_is_analytic_and_flows_to_the_student_only():
    student, teachers = _logits(4, [3, 2], seed=4)
    student.requires_grad_(True)
    for t in teachers:
        t.requires_grad_(True)
    double_distill_loss(student, teachers).backward()
    target = double_distill_target(teachers)
    torch.testing.assert_close(student.grad, 2 * (student.detach() - target) / student.numel())
    assert all(t.grad is None for t in teachers)


@pytest.mark.parametrize("splits", [[3, 2], [1, 4, 1]])
def test_gradcheck_float64(splits):
    student, teachers = _logits(3, splits, seed=5)
    packed = torch.cat(teachers, 1)
    assert torch.autograd.gradcheck(lambda s: double_distill_loss(s, packed, splits=splits),
                                    (student.requires_grad_(),), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradgradcheck(lambda s: double_distill_loss(s, packed, splits=splits),
                                        (student,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    student, teachers = _logits(5, [4, 3], seed=6)
    s, ts = student.to(dtype).requires_grad_(True), [t.to(dtype) for t in teachers]
    value = double_distill_loss(s, ts)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(formula(s.detach().double().numpy(), [t.double().numpy() for t in ts]),
                                         rel=1e-5)
    value.backward()
    assert s.grad.dtype == dtype


def test_overlapping_classes_declared_disjoint():
    student, teachers = _logits(2, [2, 3], seed=7)
    with pytest.raises(ValueError, match=r"classes: teachers were declared disjoint, but class 1 belongs to "
                                         r"teacher 0 and teacher 1"):
        double_distill_loss(student, teachers, classes=[[0, 1], [1, 2, 3]])
    with pytest.raises(ValueError, match="declared disjoint"):
        DoubleDistillLoss([2, 3], classes=[[0, 1], [1, 2, 3]])


@pytest.mark.parametrize("call, error, match", [
    (lambda s, ts: double_distill_loss(s, ts, classes=[[0, 1], [2, 3, 3]]), ValueError, "declared disjoint"),
    (lambda s, ts: double_distill_loss(s, ts, classes=[[0, 1], [2, 3]]), ValueError, r"classes\[1\] lists 2"),
    (lambda s, ts: double_distill_loss(s, ts, classes=[[0, 1], [2, 3, 9]]), ValueError, r"not a student column"),
    (lambda s, ts: double_distill_loss(s, ts, classes=[[0, 1, 2, 3, 4]]), ValueError, "one list of student columns"),
    (lambda s, ts: double_distill_loss(torch.randn(2, 6, dtype=torch.float64), ts + [torch.randn(2, 1)],
                                       classes=[[0, 1], [2, 3, 4], [4]]), ValueError, "declared disjoint"),
    (lambda s, ts: double_distill_loss(s, torch.cat(ts, 1), splits=[2, 2]), ValueError, r"sum to 4.*5 columns"),
    (lambda s, ts: double_distill_loss(s, ts, splits=[3, 2]), ValueError, "do not match the teachers"),
    (lambda s, ts: double_distill_loss(s, torch.cat(ts, 1), splits=[2, 0, 3]), ValueError, "positive ints"),
    (lambda s, ts: double_distill_loss(s[:, :4], ts), ValueError, r"student_logits \(2, 4\) must have"),
    (lambda s, ts: double_distill_loss(s[:1], ts), ValueError, r"must have the teachers' shape"),
    (lambda s, ts: double_distill_loss(s, [ts[0], ts[1][:1]]), ValueError, r"teacher_logits\[1\] has 1 rows"),
    (lambda s, ts: double_distill_loss(s, []), TypeError, "non-empty list"),
    (lambda s, ts: double_distill_loss(s.long(), ts), TypeError, "student_logits must be a floating"),
    (lambda s, ts: double_distill_loss(s, [ts[0].long(), ts[1]]), TypeError, r"teacher_logits\[0\]"),
    (lambda s, ts: double_distill_loss(s[:0], [t[:0] for t in ts]), ValueError, "B > 0"),
    (lambda s, ts: DoubleDistillLoss(classes=[[0], [1]]), ValueError, "classes needs splits"),
])
def test_bad_input(call, error, match):
    student, teachers = _logits(2, [2, 3], seed=8)
    with pytest.raises(error, match=match):
        call(student, teachers)

