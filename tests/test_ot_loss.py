"""``rcfast.losses.OTDistillLoss`` / ``ot_distill_loss``: values against POT and rcfast's
``sinkhorn`` per row, gradients against finite differences, dtypes, and bad input."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from rcfast.losses import OTDistillLoss, ot_distill_loss
from rcfast.ops import sinkhorn

ot = pytest.importorskip("ot", reason="POT is a test dependency (requirements-dev.txt)")


def logits(batch, classes, seed, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, classes, generator=g, dtype=torch.float64) * scale).to(dtype)


def cost_matrix(c_teacher, c_student, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.rand(c_teacher, c_student, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("c_teacher,c_student", [(7, 4), (3, 9), (1, 5), (6, 1)])
def test_rows_are_sinkhorn_of_the_softened_predictions(c_teacher, c_student):
    student, teacher = logits(5, c_student, 1, dtype=torch.float64), logits(5, c_teacher, 2, dtype=torch.float64)
    cost = cost_matrix(c_teacher, c_student, dtype=torch.float64)
    rows = ot_distill_loss(student, teacher, cost, temperature=2.0, eps=0.1, tol=1e-12, max_iters=100_000,
                           reduction="none")
    assert rows.shape == (5,) and rows.dtype == torch.float64
    p_teacher, p_student = torch.softmax(teacher / 2.0, dim=1), torch.softmax(student / 2.0, dim=1)
    expected = sinkhorn(p_teacher, p_student, cost, eps=0.1, tol=1e-12, max_iters=100_000)
    torch.testing.assert_close(rows, expected, rtol=1e-10, atol=1e-12)
    pot = [ot.sinkhorn2(p_teacher[i].numpy(), p_student[i].numpy(), cost.numpy(), 0.1, stopThr=1e-12,
                        numItermax=100_000) for i in range(5)]
    np.testing.assert_allclose(rows.numpy(), pot, rtol=1e-9, atol=1e-12)
    mean = ot_distill_loss(student, teacher, cost, temperature=2.0, eps=0.1, tol=1e-12, max_iters=100_000)
    total = ot_distill_loss(student, teacher, cost, temperature=2.0, eps=0.1, tol=1e-12, max_iters=100_000,
                            reduction="sum")
    assert mean.item() == pytest.approx(rows.mean().item()) and total.item() == pytest.approx(rows.sum().item())


def test_student_gradient_matches_finite_differences_and_teacher_gets_none():
    student = logits(3, 4, 3, dtype=torch.float64).requires_grad_()
    teacher = logits(3, 6, 4, dtype=torch.float64).requires_grad_()
    cost = cost_matrix(6, 4, dtype=torch.float64)

    def loss(s):
        return ot_distill_loss(s, teacher, cost, temperature=1.5, eps=0.2, tol=1e-14, max_iters=100_000)

    assert torch.autograd.gradcheck(loss, (student,), eps=1e-6, atol=1e-7, rtol=1e-5)
    loss(student).backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_logits(dtype):
    student = logits(8, 5, 5, dtype=dtype).requires_grad_()
    teacher = logits(8, 7, 6, dtype=dtype)
    cost = cost_matrix(7, 5)
    value = ot_distill_loss(student, teacher, cost, temperature=2.0)
    assert value.dtype == torch.float32
    value.backward()
    assert student.grad.dtype == dtype and torch.isfinite(student.grad.float()).all()
    # the same logits in float64
    reference = ot_distill_loss(student.detach().double(), teacher.double(), cost.double(), temperature=2.0)
    assert value.item() == pytest.approx(reference.item(), abs=2e-5)


@pytest.mark.slow
def test_minimising_it_moves_the_student_onto_the_mapped_classes():
    """Teacher class k costs nothing to student class k % 3 and 1 elsewhere: descending the
    loss makes the student predict the mapped class of the teacher's prediction."""
    cost = torch.ones(6, 3)
    cost[torch.arange(6), torch.arange(6) % 3] = 0.0
    teacher = torch.full((12, 6), -4.0)
    teacher[torch.arange(12), torch.arange(12) % 6] = 4.0
    student = logits(12, 3, 7, scale=0.1).requires_grad_()
    module = OTDistillLoss(cost, temperature=1.0, eps=0.05)
    optimiser = torch.optim.SGD([student], lr=2.0)
    first = None
    for _ in range(150):
        optimiser.zero_grad()
        value = module(student, teacher)
        first = value.item() if first is None else first
        value.backward()
        optimiser.step()
    assert value.item() < 0.2 * first
    assert torch.equal(student.argmax(dim=1), torch.arange(12) % 6 % 3)


def test_module_keeps_the_cost_as_a_buffer():
    cost = cost_matrix(4, 3)
    module = OTDistillLoss(cost, temperature=2.0, eps=0.1)
    cost.fill_(0.0)  # the module holds its own copy
    assert module.cost.abs().sum() > 0 and "cost" in module.state_dict()
    assert module.to(torch.float64).cost.dtype == torch.float64
    assert "classes=(4, 3)" in repr(module)


def test_nan_logits_give_nan_rows_quickly():
    student, teacher = logits(3, 4, 8), logits(3, 5, 9)
    teacher[1, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = ot_distill_loss(student, teacher, cost_matrix(5, 4), reduction="none", max_iters=10**9)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()


def test_bad_input():
    student, teacher, cost = logits(4, 3, 10), logits(4, 5, 11), cost_matrix(5, 3)
    with pytest.raises(ValueError, match=r"cost must be \[C_teacher, C_student\] = \[5, 3\]"):
        ot_distill_loss(student, teacher, cost_matrix(3, 5))
    with pytest.raises(ValueError, match="same non-zero batch"):
        ot_distill_loss(student[:2], teacher, cost)
    with pytest.raises(ValueError, match="same non-zero batch"):
        ot_distill_loss(student[:0], teacher[:0], cost)
    with pytest.raises(ValueError, match="student must be"):
        ot_distill_loss(student[0], teacher, cost)
    with pytest.raises(TypeError, match="teacher must be floating-point"):
        ot_distill_loss(student, teacher.long(), cost)
    with pytest.raises(ValueError, match="cost must be finite"):
        OTDistillLoss(torch.full((5, 3), float("nan")))
    with pytest.raises(TypeError, match="cost must be a"):
        OTDistillLoss([[0.0]])
    with pytest.raises(ValueError, match="temperature must be"):
        OTDistillLoss(cost, temperature=0.0)
    with pytest.raises(ValueError, match="eps must be"):
        OTDistillLoss(cost, eps=-1.0)
    with pytest.raises(ValueError, match="reduction must be"):
        OTDistillLoss(cost, reduction="batchmean")
    with pytest.raises(ValueError, match="max_iters must be"):
        OTDistillLoss(cost, max_iters=0)
