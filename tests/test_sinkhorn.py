"""``rcfast.ops.sinkhorn`` against POT (``ot.sinkhorn2``, ``ot.sinkhorn``, ``ot.emd2``),
finite differences, and its input checks.

POT is a test dependency only; rcfast never imports it.
"""
from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import pytest
import torch

from rcfast.ops import sinkhorn
from rcfast.ops.sinkhorn import _KernelLogSumExp, solve_batch

# the module itself (``rcfast.ops.sinkhorn`` is the function once rcfast.ops is imported)
sinkhorn_module = sys.modules["rcfast.ops.sinkhorn"]

ot = pytest.importorskip("ot", reason="POT is a test dependency (requirements-dev.txt)")

TIGHT = dict(tol=1e-12, max_iters=100_000)


def histograms(batch, n, dtype=torch.float64, seed=0, zeros=()):
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(batch, n, generator=g, dtype=torch.float64) + 0.05
    for index in zeros:
        h[index] = 0.0
    return (h / h.sum(dim=1, keepdim=True)).to(dtype)


def random_cost(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed + 100)
    return torch.rand(*shape, generator=g, dtype=torch.float64).to(dtype)


def pot_sinkhorn2(a, b, cost, eps, method="sinkhorn", stop=1e-12):
    """POT's value for every problem of a batch (cost shared or per problem)."""
    a, b, cost = (t.double().numpy() for t in (a, b, cost))
    out = []
    for i in range(a.shape[0]):
        c = cost if cost.ndim == 2 else cost[i]
        out.append(ot.sinkhorn2(a[i], b[i], c, eps, method=method, stopThr=stop, numItermax=100_000))
    return np.array(out, dtype=np.float64)


# --------------------------------------------------------------------------- values vs POT
@pytest.mark.parametrize("M,N", [(5, 7), (12, 3), (1, 6), (6, 1), (40, 40)])
@pytest.mark.parametrize("eps", [1.0, 0.1, 0.02])
def test_matches_pot_sinkhorn2_random_batched_costs(M, N, eps):
    a, b = histograms(4, M, seed=M), histograms(4, N, seed=N + 1)
    cost = random_cost(4, M, N, seed=M * N)
    ours = sinkhorn(a, b, cost, eps=eps, **TIGHT)
    assert ours.shape == (4,) and ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), pot_sinkhorn2(a, b, cost, eps), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(ours.numpy(), pot_sinkhorn2(a, b, cost, eps, method="sinkhorn_log"),
                               rtol=1e-9, atol=1e-11)


def test_shared_cost_and_unbatched_forms_agree_with_pot():
    a, b = histograms(6, 9, seed=1), histograms(6, 11, seed=2)
    cost = random_cost(9, 11)
    batched = sinkhorn(a, b, cost, eps=0.05, **TIGHT)
    np.testing.assert_allclose(batched.numpy(), pot_sinkhorn2(a, b, cost, 0.05), rtol=1e-9, atol=1e-11)
    # a shared [M] source and per-problem targets
    shared_a = sinkhorn(a[0], b, cost, eps=0.05, **TIGHT)
    np.testing.assert_allclose(shared_a.numpy(), pot_sinkhorn2(a[:1].expand(6, 9), b, cost, 0.05), rtol=1e-9)
    single = sinkhorn(a[3], b[3], cost, eps=0.05, **TIGHT)
    assert single.dim() == 0
    assert single.item() == pytest.approx(batched[3].item(), rel=1e-12)
    value, plan = sinkhorn(a[3], b[3], cost, eps=0.05, return_plan=True, **TIGHT)
    assert plan.shape == (9, 11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plan_matches_pot_and_has_the_marginals(dtype):
    a, b = histograms(3, 8, dtype, seed=3), histograms(3, 10, dtype, seed=4)
    cost = random_cost(3, 8, 10, seed=5, dtype=dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    value, plan = sinkhorn(a, b, cost, eps=0.1, tol=tol, max_iters=100_000, return_plan=True)
    assert plan.shape == (3, 8, 10) and plan.dtype == dtype and not plan.requires_grad
    atol = 2e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(plan.sum(dim=2), a, rtol=0, atol=atol)
    torch.testing.assert_close(plan.sum(dim=1), b, rtol=0, atol=atol)
    torch.testing.assert_close((plan * cost).sum(dim=(1, 2)), value, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                               atol=0)
    for i in range(3):
        ref = ot.sinkhorn(a[i].double().numpy(), b[i].double().numpy(), cost[i].double().numpy(), 0.1,
                          stopThr=tol / 10, numItermax=100_000)
        np.testing.assert_allclose(plan[i].double().numpy(), ref, atol=atol)


def test_float32_agrees_with_float64_pot():
    a, b = histograms(8, 30, seed=6), histograms(8, 20, seed=7)
    cost = random_cost(30, 20, seed=8)
    ours = sinkhorn(a.float(), b.float(), cost.float(), eps=0.05, tol=1e-6)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.double().numpy(), pot_sinkhorn2(a, b, cost, 0.05), rtol=0, atol=2e-6)


def test_zero_mass_entries_match_pot():
    a = histograms(3, 7, seed=9, zeros=[(0, 2), (1, 0), (1, 6), (2, 3)])
    b = histograms(3, 5, seed=10, zeros=[(0, 4), (2, 0), (2, 1)])
    cost = random_cost(3, 7, 5, seed=11)
    value, plan = sinkhorn(a, b, cost, eps=0.1, return_plan=True, **TIGHT)
    assert torch.isfinite(value).all()
    # POT's default (exp-domain) solver divides by the masses; its log-domain one takes zeros.
    np.testing.assert_allclose(value.numpy(), pot_sinkhorn2(a, b, cost, 0.1, method="sinkhorn_log"),
                               rtol=1e-9, atol=1e-12)
    assert (plan[a == 0] == 0).all() and (plan.transpose(1, 2)[b == 0] == 0).all()


# --------------------------------------------------------------------------- structured problems
@pytest.mark.slow
def test_structured_problems():
    # Identical histograms and a zero diagonal: the cost tends to 0 as eps -> 0.
    a = histograms(1, 6, seed=12)
    off_diagonal = 1.0 - torch.eye(6, dtype=torch.float64)
    assert sinkhorn(a, a, off_diagonal, eps=1e-3, **TIGHT).item() < 1e-12
    # A permutation: all mass moves along it at cost 0, elsewhere cost 1.
    perm = torch.tensor([3, 0, 4, 1, 2])
    cost = torch.ones(5, 5, dtype=torch.float64)
    cost[torch.arange(5), perm] = 0.0
    src = histograms(1, 5, seed=13)
    dst = torch.zeros_like(src)
    dst[0, perm] = src[0]
    assert sinkhorn(src, dst, cost, eps=1e-3, **TIGHT).item() < 1e-12
    # 1-D Gaussians on a grid with squared distances: POT and, for small eps, the exact LP.
    x = torch.linspace(0, 1, 50, dtype=torch.float64)
    cost = (x[:, None] - x[None, :]) ** 2
    g1 = torch.exp(-((x - 0.3) ** 2) / 0.01)
    g2 = torch.exp(-((x - 0.6) ** 2) / 0.02)
    g1, g2 = (g1 / g1.sum()).unsqueeze(0), (g2 / g2.sum()).unsqueeze(0)
    for eps in (1e-2, 1e-3):
        ours = sinkhorn(g1, g2, cost, eps=eps, **TIGHT).item()
        assert ours == pytest.approx(pot_sinkhorn2(g1, g2, cost, eps, method="sinkhorn_log")[0], rel=1e-8)
    exact = ot.emd2(g1[0].numpy(), g2[0].numpy(), cost.numpy())
    assert exact <= sinkhorn(g1, g2, cost, eps=1e-4, **TIGHT).item() <= exact + 1e-4 * math.log(50)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1.0), (torch.float32, 1e4), (torch.float64, 1e4)])
def test_small_eps_is_stable_and_approaches_emd(dtype, scale):
    """eps = 1e-3 of the cost scale: finite, between emd2 and emd2 + eps log(min(M, N))."""
    M, N = 12, 9
    a, b = histograms(3, M, seed=14), histograms(3, N, seed=15)
    cost = random_cost(3, M, N, seed=16) * scale
    eps = 1e-3 * scale
    # float32 potentials are ~1e3 here, so the plan's column sums are good to ~1e-6 only.
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converges: no max_iters warning
        ours = sinkhorn(a.to(dtype), b.to(dtype), cost.to(dtype), eps=eps, tol=tol, max_iters=100_000)
    assert torch.isfinite(ours).all()
    emd = np.array([ot.emd2(a[i].numpy(), b[i].numpy(), cost[i].numpy()) for i in range(3)])
    slack = 2e-5 * scale if dtype == torch.float32 else 1e-9 * scale
    assert (ours.double().numpy() >= emd - slack).all()
    assert (ours.double().numpy() <= emd + eps * math.log(min(M, N)) + slack).all()
    ref = pot_sinkhorn2(a, b, cost, eps, method="sinkhorn_log", stop=1e-10)
    atol = (5e-6 if dtype == torch.float32 else 1e-9) * scale
    np.testing.assert_allclose(ours.double().numpy(), ref, rtol=0, atol=atol)


def test_gemm_reductions_fall_back_exactly_where_they_underflow():
    """The GEMM form of the log-sum-exps against torch.logsumexp, with potentials spread so
    far that some (not all) rows underflow in float32."""
    g = torch.Generator().manual_seed(17)
    log_kernel = -torch.rand(4, 20, 15, generator=g) / 1e-3
    v = torch.randn(4, 15, generator=g) * 300.0
    u = torch.randn(4, 20, generator=g) * 300.0
    lse = _KernelLogSumExp(log_kernel)
    by_gemm = lse.over_columns(v)
    torch.testing.assert_close(by_gemm, torch.logsumexp(log_kernel + v.unsqueeze(1), dim=2), rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(lse.over_rows(u), torch.logsumexp(log_kernel + u.unsqueeze(2), dim=1),
                               rtol=1e-6, atol=1e-3)
    values = torch.rand(4, 20, 15, generator=g)
    expected = (torch.softmax(log_kernel + v.unsqueeze(1), dim=2) * values).sum(dim=2)
    torch.testing.assert_close(lse.row_mean(v, values), expected, rtol=1e-5, atol=1e-6)
    # a kernel shared by the batch
    shared = _KernelLogSumExp(log_kernel[:1])
    torch.testing.assert_close(shared.over_columns(v), torch.logsumexp(log_kernel[:1] + v.unsqueeze(1), dim=2),
                               rtol=1e-6, atol=1e-3)


def test_chunked_batches_give_the_same_values(monkeypatch):
    a, b = histograms(7, 6, seed=18), histograms(7, 5, seed=19)
    cost = random_cost(7, 6, 5, seed=20)
    whole = sinkhorn(a, b, cost, eps=0.1, **TIGHT)
    monkeypatch.setattr(sinkhorn_module, "CHUNK_ELEMENTS", 60)  # two problems per chunk
    chunked = sinkhorn(a, b, cost, eps=0.1, **TIGHT)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)
    a.requires_grad_()
    chunked_grad, = torch.autograd.grad(sinkhorn(a, b, cost, eps=0.1, **TIGHT).sum(), a)
    monkeypatch.undo()
    whole_grad, = torch.autograd.grad(sinkhorn(a, b, cost, eps=0.1, **TIGHT).sum(), a)
    torch.testing.assert_close(chunked_grad, whole_grad, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("shared_cost", [False, True])
@pytest.mark.parametrize("M,N", [(4, 6), (6, 3)])
def test_gradcheck_float64(shared_cost, M, N):
    """Implicit gradients against finite differences (a, b and cost; both K x K systems)."""
    a = histograms(2, M, seed=21).requires_grad_()
    b = histograms(2, N, seed=22).requires_grad_()
    cost = random_cost(*(() if shared_cost else (2,)), M, N, seed=23).requires_grad_()

    def value(a, b, cost):
        return sinkhorn(a, b, cost, eps=0.2, tol=1e-14, max_iters=100_000)

    # The step stays below the sum-to-1 tolerance of the masses.
    assert torch.autograd.gradcheck(value, (a, b, cost), eps=1e-7, atol=1e-6, rtol=1e-5)


def test_gradients_match_pot_autodiff():
    """POT differentiates through its iterations; at convergence both are the same gradient
    (ours is the mass-preserving representative: <grad_a, a> = 0)."""
    a, b, cost = histograms(1, 5, seed=24)[0], histograms(1, 7, seed=25)[0], random_cost(5, 7, seed=26)
    pa, pb, pc = (t.clone().requires_grad_() for t in (a, b, cost))
    ref = ot.sinkhorn2(pa, pb, pc, 0.1, method="sinkhorn_log", stopThr=1e-14, numItermax=100_000)
    ref_grads = torch.autograd.grad(ref, (pa, pb, pc))
    oa, ob, oc = (t.clone().requires_grad_() for t in (a, b, cost))
    ours = sinkhorn(oa, ob, oc, eps=0.1, tol=1e-14, max_iters=100_000)
    grads = torch.autograd.grad(ours, (oa, ob, oc))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(grads[0], ref_grads[0] - (ref_grads[0] * a).sum(), rtol=0, atol=1e-10)
    torch.testing.assert_close(grads[1], ref_grads[1] - (ref_grads[1] * b).sum(), rtol=0, atol=1e-10)
    torch.testing.assert_close(grads[2], ref_grads[2], rtol=0, atol=1e-10)
    assert abs((grads[0] * a).sum().item()) < 1e-12 and abs((grads[1] * b).sum().item()) < 1e-12


def test_gradient_at_zero_mass_entries_is_the_one_sided_derivative():
    a = histograms(1, 5, seed=27, zeros=[(0, 1)])[0]
    b = histograms(1, 6, seed=28, zeros=[(0, 3)])[0]
    cost = random_cost(5, 6, seed=29)
    opts = dict(eps=0.1, tol=1e-14, max_iters=100_000)
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    base = sinkhorn(a_, b_, cost, **opts)
    grad_a, grad_b = torch.autograd.grad(base, (a_, b_))
    assert torch.isfinite(grad_a).all() and torch.isfinite(grad_b).all()
    h = 1e-7
    for masses, grad, zero in ((a, grad_a, 1), (b, grad_b, 3)):
        step = torch.zeros_like(masses)
        step[zero], step[0] = h, -h  # move mass onto the empty entry
        moved = (sinkhorn(masses + step, b, cost, **opts) if masses is a else sinkhorn(a, masses + step, cost, **opts))
        one_sided = (moved - base.detach()).item() / h
        assert one_sided == pytest.approx((grad[zero] - grad[0]).item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_compute_in_float32(dtype):
    a, b = histograms(3, 6, seed=30), histograms(3, 4, seed=31)
    cost = random_cost(6, 4, seed=32)
    low_a = a.to(dtype).requires_grad_()
    value = sinkhorn(low_a, b.to(dtype), cost.to(dtype), eps=0.1, tol=1e-6)
    assert value.dtype == torch.float32
    value.sum().backward()
    assert low_a.grad.dtype == dtype and torch.isfinite(low_a.grad.float()).all()
    # the inputs as rounded to dtype, solved in float64 by POT
    ref = pot_sinkhorn2(a.to(dtype).double() / a.to(dtype).double().sum(1, keepdim=True),
                        b.to(dtype).double() / b.to(dtype).double().sum(1, keepdim=True), cost.to(dtype).double(), 0.1)
    np.testing.assert_allclose(value.detach().double().numpy(), ref, atol=1e-5)


def test_double_backward_is_refused():
    a = histograms(1, 4, seed=33).requires_grad_()
    value = sinkhorn(a, histograms(1, 3, seed=34), random_cost(4, 3), eps=0.1)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(value.sum(), a, create_graph=True)


# --------------------------------------------------------------------------- convergence, NaN
def test_warns_when_max_iters_is_reached_first():
    a, b = histograms(2, 30, seed=35), histograms(2, 30, seed=36)
    cost = random_cost(30, 30, seed=37)
    with pytest.warns(RuntimeWarning, match="marginal error is still above tol=1e-09 after max_iters=3"):
        sinkhorn(a, b, cost, eps=1e-3, max_iters=3, tol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sinkhorn(a, b, cost, eps=0.5, tol=1e-6)


def test_nan_in_nan_out_without_iterating_to_the_cap():
    a, b = histograms(2, 5, torch.float32, seed=38), histograms(2, 4, torch.float32, seed=39)
    a[1, 2] = float("nan")
    value = solve_batch(a, b, random_cost(1, 5, 4, dtype=torch.float32), 0.1, max_iters=10**9, tol=1e-6)
    assert torch.isnan(value[1])


# --------------------------------------------------------------------------- bad input
def test_bad_input_raises_naming_the_argument():
    a, b, cost = histograms(2, 3, seed=40), histograms(2, 4, seed=41), random_cost(3, 4)
    with pytest.raises(ValueError, match=r"a: masses must be >= 0"):
        sinkhorn(torch.tensor([[0.5, 0.7, -0.2]] * 2, dtype=torch.float64), b, cost)
    with pytest.raises(ValueError, match=r"b: masses must be finite"):
        sinkhorn(a, torch.tensor([[0.5, float("inf"), 0.0, 0.5]] * 2, dtype=torch.float64), cost)
    with pytest.raises(ValueError, match=r"b: masses must be finite, found nan"):
        sinkhorn(a, torch.tensor([[0.5, float("nan"), 0.0, 0.5]] * 2, dtype=torch.float64), cost)
    with pytest.raises(ValueError, match=r"a: masses must sum to 1, but sum to 0\.9 \(row 1 of 2.*off by -0\.1"):
        sinkhorn(torch.tensor([[0.2, 0.3, 0.5], [0.2, 0.3, 0.4]], dtype=torch.float64), b, cost)
    with pytest.raises(ValueError, match=r"b: masses must sum to 1, but sum to 2 , off by \+1|b: masses must sum to 1"):
        sinkhorn(a[0], torch.full((4,), 0.5, dtype=torch.float64), cost)
    with pytest.raises(ValueError, match=r"cost must be \[M, N\] = \[3, 4\] or \[2, 3, 4\]"):
        sinkhorn(a, b, random_cost(4, 3))
    with pytest.raises(ValueError, match=r"cost must have 2 or 3 dimensions"):
        sinkhorn(a, b, random_cost(3))
    with pytest.raises(ValueError, match="batch sizes differ"):
        sinkhorn(a, histograms(3, 4), cost)
    with pytest.raises(ValueError, match="cost must be finite"):
        sinkhorn(a, b, torch.full((3, 4), float("inf"), dtype=torch.float64))
    for eps in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be finite and > 0"):
            sinkhorn(a, b, cost, eps=eps)
    with pytest.raises(TypeError, match="eps must be a float"):
        sinkhorn(a, b, cost, eps=torch.tensor(0.1))
    with pytest.raises(ValueError, match="max_iters must be an int >= 1"):
        sinkhorn(a, b, cost, max_iters=0)
    with pytest.raises(ValueError, match="tol must be a finite float >= 0"):
        sinkhorn(a, b, cost, tol=-1.0)
    with pytest.raises(TypeError, match="a must be a torch.Tensor"):
        sinkhorn([0.5, 0.5], b, cost)
    with pytest.raises(TypeError, match="b must be a floating-point tensor"):
        sinkhorn(a, torch.ones(2, 4, dtype=torch.int64), cost)
    with pytest.raises(ValueError, match="the batch is empty"):
        sinkhorn(a[:0], b[:0], cost)
    with pytest.raises(ValueError, match="at least one entry"):
        sinkhorn(a[:, :0], b, cost[:0])


def test_mass_tolerance_accepts_rounding_but_reports_real_errors():
    # float32 softmax output of 1000 classes sums to 1 only up to rounding: accepted.
    a = torch.softmax(torch.randn(4, 1000, generator=torch.Generator().manual_seed(42)), dim=1)
    b = torch.softmax(torch.randn(4, 10, generator=torch.Generator().manual_seed(43)), dim=1)
    assert torch.isfinite(sinkhorn(a, b, torch.rand(1000, 10), eps=0.1)).all()
    with pytest.raises(ValueError, match="off by"):
        sinkhorn(a * 1.001, b, torch.rand(1000, 10), eps=0.1)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    a, b = histograms(16, 50, torch.float32, seed=44), histograms(16, 40, torch.float32, seed=45)
    cost = random_cost(50, 40, seed=46, dtype=torch.float32)
    cpu = sinkhorn(a, b, cost, eps=0.05, tol=1e-6)
    gpu = sinkhorn(a.cuda(), b.cuda(), cost.cuda(), eps=0.05, tol=1e-6)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)
    a_gpu = a.cuda().requires_grad_()
    grad_gpu, = torch.autograd.grad(sinkhorn(a_gpu, b.cuda(), cost.cuda(), eps=0.05, tol=1e-6).sum(), a_gpu)
    a_cpu = a.clone().requires_grad_()
    grad_cpu, = torch.autograd.grad(sinkhorn(a_cpu, b, cost, eps=0.05, tol=1e-6).sum(), a_cpu)
    torch.testing.assert_close(grad_gpu.cpu(), grad_cpu, rtol=1e-3, atol=1e-5)
