"""``rcfast.ops.sinkhorn``: batched entropic optimal transport in the log domain.

The problem, for each of ``B`` pairs of histograms ``a [M]``, ``b [N]`` and a
cost ``C [M, N]`` (POT's ``ot.sinkhorn2`` convention)::

    P* = argmin_{P >= 0, P 1 = a, P^T 1 = b}  <P, C> + eps * sum_ij P_ij log P_ij
    returned: <P*, C>          (the transport cost WITHOUT the entropic term)

Iterations (POT's ``sinkhorn_log`` sequence: ``f``/``g`` start at 0, ``g`` is
updated before ``f``) run on the scaled dual potentials ``u = f / eps``,
``v = g / eps`` with ``logsumexp`` only, so nothing over- or underflows in
float32 even for ``eps`` 1e-3 of the cost scale. After every ``f`` update the
rows of the plan ``P_ij = exp(u_i + v_j - C_ij / eps)`` sum to ``a`` exactly;
the run stops when the column error ``||P^T 1 - b||_2`` (POT's ``stopThr``
criterion, checked every ``CHECK_EVERY`` iterations as POT does) is below
``tol`` for every problem of the batch. Zero-mass entries are allowed: their
potential is ``-inf`` and their row/column of the plan is 0.

Gradients are *implicit*: the backward pass differentiates the fixed-point
equations of Sinkhorn at the converged potentials (implicit function theorem)
and so gives the exact gradient of the returned ``<P*, C>`` -- up to the
convergence tolerance -- with respect to ``a``, ``b`` and ``cost``, at the cost
of one batched ``K x K`` linear solve, ``K = min(M, N)``. No iteration is
stored (memory is that of the forward), and the number of iterations does not
matter. The envelope-theorem shortcut (gradient = dual potentials / plan) was
not used because it is the gradient of the entropic objective, not of the
cost returned here. Double backward is not supported.

Masses are normalised to sum exactly to 1 after the validation, which removes
rounding error; the gradient is that of the normalised problem, so the
gradients with respect to ``a`` and ``b`` satisfy ``<grad_a, a> = 0`` and
``<grad_b, b> = 0`` (only mass-preserving changes of ``a`` matter).
"""
from __future__ import annotations

import math
import warnings
from numbers import Real

import torch

__all__ = ["sinkhorn"]

#: iterations between two checks of the marginal error (a host sync each; POT checks every 10 too).
CHECK_EVERY = 10
#: elements of one ``[chunk, M, N]`` temporary; larger batches are solved chunk by chunk.
CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------- checks
def _check_tensor(name: str, x, dims: tuple[int, ...]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(x.shape)}")


def _mass_sum_tolerance(dtype: torch.dtype, n: int) -> float:
    """How far a histogram's sum may be from 1: rounding of ``n`` entries in ``dtype``, at least 1e-6."""
    return max(1e-6, 4.0 * math.sqrt(n) * torch.finfo(dtype).eps)


def _check_masses(name: str, masses: torch.Tensor) -> None:
    """Raise ValueError for negative, non-finite or not-summing-to-1 histograms (rows of ``[B, n]``)."""
    bad = ~torch.isfinite(masses)
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: masses must be finite, found {masses[index].item()} at index {index}")
    negative = masses < 0
    if negative.any():
        index = tuple(int(i) for i in negative.nonzero()[0])
        raise ValueError(f"{name}: masses must be >= 0, found {masses[index].item()} at index {index}")
    sums = masses.sum(dim=-1, dtype=torch.float64).reshape(-1)
    off = (sums - 1.0).abs()
    tolerance = _mass_sum_tolerance(masses.dtype, masses.shape[-1])
    worst = int(off.argmax())
    if off[worst] > tolerance:
        rows_off = int((off > tolerance).sum())
        where = "" if masses.dim() == 1 else f" (row {worst} of {masses.shape[0]}; {rows_off} rows off)"
        raise ValueError(f"{name}: masses must sum to 1, but sum to {sums[worst].item():.9g}{where}, "
                         f"off by {(sums[worst] - 1.0).item():+.3g} (tolerance {tolerance:.2g})")


def _check_args(a, b, cost, eps, max_iters, tol) -> tuple[int | None, int, int]:
    """Validate everything before any work; return ``(batch or None, M, N)``."""
    _check_tensor("a", a, (1, 2))
    _check_tensor("b", b, (1, 2))
    _check_tensor("cost", cost, (2, 3))
    if not (a.device == b.device == cost.device):
        raise ValueError(f"a, b and cost must be on one device, got {a.device}, {b.device} and {cost.device}")
    M, N = a.shape[-1], b.shape[-1]
    if M == 0 or N == 0:
        raise ValueError(f"a and b need at least one entry each, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    batches = {name: t.shape[0] for name, t, d in (("a", a, 2), ("b", b, 2), ("cost", cost, 3)) if t.dim() == d}
    if len(set(batches.values())) > 1:
        raise ValueError(f"batch sizes differ: {batches}")
    batch = next(iter(batches.values()), None)
    if batch == 0:
        raise ValueError("the batch is empty (B = 0)")
    if tuple(cost.shape[-2:]) != (M, N):
        expected = f"[M, N] = [{M}, {N}]" + (f" or [{batch}, {M}, {N}]" if batch else f" or [B, {M}, {N}]")
        raise ValueError(f"cost must be {expected} (M from a, N from b), got shape {tuple(cost.shape)}")
    if not isinstance(eps, Real) or isinstance(eps, bool):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 1:
        raise ValueError(f"max_iters must be an int >= 1, got {max_iters!r}")
    if not isinstance(tol, Real) or isinstance(tol, bool) or not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite float >= 0, got {tol!r}")
    if not torch.isfinite(cost).all():
        raise ValueError("cost must be finite (no inf or NaN entries)")
    _check_masses("a", a)
    _check_masses("b", b)
    return batch, M, N


# --------------------------------------------------------------------------- solver
def _chunks(batch: int, M: int, N: int):
    step = max(1, CHUNK_ELEMENTS // (M * N))
    return [slice(start, min(start + step, batch)) for start in range(0, batch, step)]


class _KernelLogSumExp:
    """The reductions of a log-domain Sinkhorn step over the log-kernel ``L = -C / eps``
    (``logsumexp_j(L_ij + v_j)``, ``logsumexp_i(L_ij + u_i)``), as matrix products.

    ``logsumexp_j(L_ij + v_j) = alpha_i + beta + log sum_j exp(L_ij - alpha_i) exp(v_j - beta)``
    with ``alpha_i = max_j L_ij`` and ``beta = max_j v_j``: both exponentials are
    <= 1 (nothing overflows) and the sum is one GEMM with the kernel
    ``exp(L - alpha)`` computed once, instead of an exp per kernel entry and
    iteration. A term of the sum underflows only below ~exp(-87) (float32);
    while the sum is above ``exp(-UNDERFLOW_GUARD)``, such terms are negligible
    and the result is exact to rounding. Rows whose sum falls below it (small
    ``eps``, mass sent far from a row's cheapest column) are recomputed with
    ``torch.logsumexp``, so the iterates are those of the plain log-domain
    algorithm in every case.
    """

    UNDERFLOW_GUARD = {torch.float32: 30.0, torch.float64: 300.0}

    def __init__(self, log_kernel: torch.Tensor) -> None:
        self.log_kernel = log_kernel                         # [B or 1, M, N]
        self.row_max = log_kernel.amax(dim=2, keepdim=True)  # alpha, [B or 1, M, 1]
        self.col_max = log_kernel.amax(dim=1, keepdim=True)  # [B or 1, 1, N]
        self.row_kernel = torch.exp(log_kernel - self.row_max)
        self.col_kernel_t = torch.exp(log_kernel - self.col_max).transpose(1, 2)
        self.floor = math.exp(-self.UNDERFLOW_GUARD[log_kernel.dtype])
        # Set once most problems need the exact path: then the GEMM is wasted work.
        self.exact_only = False

    @staticmethod
    def _matvec(kernel: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if kernel.shape[0] == 1:  # one kernel for the batch: a single GEMM
            return weights @ kernel[0].transpose(0, 1)
        return torch.bmm(kernel, weights.unsqueeze(2)).squeeze(2)

    def _exact(self, exact, problems: torch.Tensor) -> torch.Tensor:
        """``exact(log_kernel, index)`` for ``problems``, a few at a time (it materialises
        ``[problems, M, N]``)."""
        M, N = self.log_kernel.shape[1:]
        parts = []
        for part in _chunks(len(problems), M, N):
            index = problems[part]
            kernel = self.log_kernel if self.log_kernel.shape[0] == 1 else self.log_kernel[index]
            parts.append(exact(kernel, index))
        return torch.cat(parts)

    def _reduce(self, kernel, weights_log, shift_back, exact, values=None):
        """``log sum`` (or, with ``values``, the weighted mean) by GEMM, rows that underflowed
        recomputed by ``exact``."""
        batch = weights_log.shape[0]
        if self.exact_only:
            return self._exact(exact, torch.arange(batch, device=weights_log.device))
        shift = weights_log.amax(dim=1, keepdim=True)
        weights = torch.exp(weights_log - shift)
        sums = self._matvec(kernel, weights)
        if values is None:
            result = torch.log(sums) + shift_back + shift
        else:
            result = self._matvec(kernel * values, weights) / sums
        low = sums < self.floor
        if not low.any():
            return result
        problems = low.any(dim=1).nonzero().squeeze(1)
        if 2 * len(problems) > batch:
            self.exact_only = True
        return result.index_put((problems,), torch.where(low[problems], self._exact(exact, problems),
                                                         result[problems]))

    def over_columns(self, v: torch.Tensor) -> torch.Tensor:
        """``logsumexp_j(L_ij + v_j)``: ``v [B, N]`` -> ``[B, M]``."""
        return self._reduce(self.row_kernel, v, self.row_max.squeeze(2),
                            lambda L, i: torch.logsumexp(L + v[i].unsqueeze(1), dim=2))

    def over_rows(self, u: torch.Tensor) -> torch.Tensor:
        """``logsumexp_i(L_ij + u_i)``: ``u [B, M]`` -> ``[B, N]``."""
        return self._reduce(self.col_kernel_t, u, self.col_max.squeeze(1),
                            lambda L, i: torch.logsumexp(L + u[i].unsqueeze(2), dim=1))

    def row_mean(self, v: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``sum_j R_ij values_ij`` with the plan's row conditionals ``R_ij = softmax_j(L_ij + v_j)``:
        ``v [B, N]``, ``values [B or 1, M, N]`` -> ``[B, M]``."""
        def exact(L, i):
            vals = values if values.shape[0] == 1 else values[i]
            return (torch.softmax(L + v[i].unsqueeze(1), dim=2) * vals).sum(dim=2)

        return self._reduce(self.row_kernel, v, None, exact, values)


def _solve_chunk(log_a, log_b, cost, eps: float, max_iters: int, tol: float):
    """Log-domain Sinkhorn on one chunk; returns ``(<P, C> [chunk], u, v, marginal_error [chunk])``.

    ``cost`` is ``[chunk or 1, M, N]``; ``log_a [chunk, M]`` and ``log_b [chunk, N]``
    hold ``-inf`` for zero masses.
    """
    lse = _KernelLogSumExp(-cost / eps)
    b = torch.exp(log_b)
    u = torch.zeros_like(log_a)
    # logsumexp over rows for the next v update; it also gives the current column marginals.
    col_lse = lse.over_rows(u)
    error = torch.full_like(log_b[:, 0], math.inf)
    for it in range(max_iters):
        v = log_b - col_lse
        u = log_a - lse.over_columns(v)
        col_lse = lse.over_rows(u)
        if it % CHECK_EVERY == 0 or it == max_iters - 1:
            error = torch.linalg.vector_norm(torch.exp(v + col_lse) - b, dim=1)
            worst = error.max()
            # NaN in, NaN out -- and at once: a NaN problem never converges.
            if worst < tol or torch.isnan(worst):
                break
    # After the last u update P_ij = a_i R_ij exactly, so <P, C> = sum_i a_i E_R[C_i.].
    value = (torch.exp(log_a) * lse.row_mean(v, cost)).sum(dim=1)
    return value, u, v, error


def _solve(a, b, cost, eps: float, max_iters: int, tol: float):
    """All chunks: ``(<P, C> [B], u [B, M], v [B, N], error [B])``; ``cost`` is ``[B or 1, M, N]``."""
    batch, M, N = a.shape[0], a.shape[1], b.shape[1]
    log_a, log_b = torch.log(a), torch.log(b)
    if cost.shape[0] == 1:
        # One shared kernel: the iterations hold only [B, M] and [B, N] tensors.
        return _solve_chunk(log_a, log_b, cost, eps, max_iters, tol)
    parts = [_solve_chunk(log_a[rows], log_b[rows], cost[rows], eps, max_iters, tol)
             for rows in _chunks(batch, M, N)]
    return tuple(torch.cat(part) for part in zip(*parts))


def _plan(u, v, cost, eps: float):
    return torch.exp(u.unsqueeze(2) + v.unsqueeze(1) - cost / eps)


def _implicit_vjp(u, v, cost, eps: float, grad_value):
    """Gradients of ``<P*, C>`` w.r.t. ``a``, ``b`` and ``cost`` at the fixed point (one chunk).

    At the fixed point, the dual perturbations ``(df, dg)`` solve
    ``[[diag a, P], [P^T, diag b]] (df, dg) = eps (da, db) + ((P*dC) 1, (P*dC)^T 1)``.
    With ``(x, y)`` the solution of that (symmetric) system for the right-hand
    side ``(P C 1, (P C)^T 1)``, the gradient of ``<P, C>`` is ``x`` for ``a``,
    ``y`` for ``b`` and ``P * (1 + (x_i + y_j - C_ij) / eps)`` for ``cost``.
    Dividing the rows by ``a`` and the columns by ``b`` turns the system into
    ``x + R y = rowmean_R(C)``, ``y + Q^T x = colmean_Q(C)`` with ``R``/``Q`` the
    row/column conditionals of the plan (softmaxes of the log-plan), which stays
    defined for zero masses (the one-sided derivative there). Eliminating the
    larger side leaves a ``K x K`` system, ``K = min(M, N)``, singular only
    along ``x + t, y - t``; adding ``1 w^T`` with ``w`` = the masses of that side
    picks the solution with ``<w, x> = 0``.
    """
    log_kernel = -cost / eps
    plan = torch.exp(u.unsqueeze(2) + v.unsqueeze(1) + log_kernel)
    # R_ij = P_ij / a_i and Q_ij = P_ij / b_j, written without u (resp. v) so that
    # they stay defined on zero-mass rows (resp. columns), where u (v) is -inf.
    rows = torch.softmax(log_kernel + v.unsqueeze(1), dim=2)
    cols = torch.softmax(log_kernel + u.unsqueeze(2), dim=1)
    row_cost = (rows * cost).sum(dim=2)      # [B, M]
    col_cost = (cols * cost).sum(dim=1)      # [B, N]
    M, N = u.shape[1], v.shape[1]
    if N <= M:
        # (I - Q^T R + 1 b^T) y = colmean - Q^T rowmean
        b = plan.sum(dim=1)
        system = torch.eye(N, dtype=u.dtype, device=u.device) - cols.transpose(1, 2) @ rows + b.unsqueeze(1)
        rhs = col_cost - (cols.transpose(1, 2) @ row_cost.unsqueeze(2)).squeeze(2)
        y = torch.linalg.solve(system, rhs)
        x = row_cost - (rows @ y.unsqueeze(2)).squeeze(2)
    else:
        a = plan.sum(dim=2)
        system = torch.eye(M, dtype=u.dtype, device=u.device) - rows @ cols.transpose(1, 2) + a.unsqueeze(1)
        rhs = row_cost - (rows @ col_cost.unsqueeze(2)).squeeze(2)
        x = torch.linalg.solve(system, rhs)
        y = col_cost - (cols.transpose(1, 2) @ x.unsqueeze(2)).squeeze(2)
    scale = grad_value.view(-1, 1, 1)
    grad_cost = scale * plan * (1.0 + (x.unsqueeze(2) + y.unsqueeze(1) - cost) / eps)
    return grad_value.view(-1, 1) * x, grad_value.view(-1, 1) * y, grad_cost


class _Sinkhorn(torch.autograd.Function):
    """``<P*, C>`` with implicit gradients; ``a [B, M]``, ``b [B, N]``, ``cost [B or 1, M, N]``."""

    @staticmethod
    def forward(ctx, a, b, cost, eps, max_iters, tol):
        value, u, v, error = _solve(a, b, cost, eps, max_iters, tol)
        ctx.save_for_backward(u, v, cost)
        ctx.eps = eps
        ctx.mark_non_differentiable(u, v, error)
        return value, u, v, error

    @staticmethod
    def backward(ctx, grad_value, _grad_u, _grad_v, _grad_error):
        if torch.is_grad_enabled():
            # The gradient below treats the plan as a constant: its own derivative would be wrong.
            raise RuntimeError("sinkhorn: double backward (create_graph=True through sinkhorn) is not supported")
        u, v, cost = ctx.saved_tensors
        batch, M, N = u.shape[0], u.shape[1], v.shape[1]
        grads_a, grads_b, grads_cost = [], [], []
        for rows in _chunks(batch, M, N):
            c = cost if cost.shape[0] == 1 else cost[rows]
            ga, gb, gc = _implicit_vjp(u[rows], v[rows], c, ctx.eps, grad_value[rows])
            grads_a.append(ga), grads_b.append(gb), grads_cost.append(gc)
        grad_cost = torch.cat(grads_cost)
        if cost.shape[0] == 1:
            grad_cost = grad_cost.sum(dim=0, keepdim=True)
        return torch.cat(grads_a), torch.cat(grads_b), grad_cost, None, None, None


def _warn_unconverged(error: torch.Tensor, max_iters: int, tol: float) -> None:
    worst = error.max().item()
    if worst >= tol and math.isfinite(worst):
        # One text per setting (no measured value in it), so a training loop warns once, not every step.
        warnings.warn(f"sinkhorn: the marginal error is still above tol={tol:g} after max_iters={max_iters} "
                      "iterations; raise max_iters or eps", RuntimeWarning, stacklevel=3)


def solve_batch(a, b, cost, eps: float, max_iters: int, tol: float, return_plan: bool = False):
    """The unchecked batched solver behind :func:`sinkhorn` (for callers that validated already).

    ``a [B, M]``, ``b [B, N]`` float32/float64 histograms summing to 1,
    ``cost [B or 1, M, N]`` of the same dtype. Returns ``<P*, C>`` ``[B]`` (and
    the plan ``[B, M, N]``, detached, when ``return_plan``).
    """
    value, u, v, error = _Sinkhorn.apply(a, b, cost, eps, max_iters, tol)
    _warn_unconverged(error, max_iters, tol)
    if not return_plan:
        return value
    with torch.no_grad():
        return value, _plan(u, v, cost, eps)


def sinkhorn(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, eps: float = 0.05, max_iters: int = 1000,
             tol: float = 1e-6, return_plan: bool = False):
    """Batched entropic optimal transport cost ``<P*, C>`` (POT's ``ot.sinkhorn2`` convention).

    Args:
        a: source histograms ``[B, M]`` or one ``[M]`` shared by the batch;
            entries >= 0 summing to 1 (zeros allowed).
        b: target histograms ``[B, N]`` or ``[N]``, likewise.
        cost: ``[M, N]`` shared by the batch, or ``[B, M, N]``; finite.
        eps: entropic regularisation, in the units of ``cost`` (POT's ``reg``);
            scale the cost (e.g. to [0, 1]) to make it relative. Any value
            down to 1e-3 of the cost scale is stable in float32 (log domain),
            though small values need many iterations.
        max_iters: iteration cap (a warning says when it is reached before ``tol``).
        tol: stop when the L2 error of the plan's column sums is below ``tol``
            for every problem (POT's ``stopThr``; the row sums are exact).
        return_plan: also return the plan ``P*`` (detached: no gradient flows
            through it).

    Returns:
        the transport cost ``[B]`` -- a 0-d tensor when none of ``a``, ``b``,
        ``cost`` has a batch dimension -- and, with ``return_plan``, the plan
        ``[B, M, N]`` (``[M, N]`` unbatched). float64 inputs compute in
        float64; anything else in float32 (the result is float32).

    Gradients flow to ``a``, ``b`` and ``cost`` by implicit differentiation
    (see the module docstring): exact for the returned cost at convergence.

    Raises:
        TypeError: a non-tensor or non-floating input, a non-float ``eps``.
        ValueError: negative, non-finite or not-summing-to-1 masses (the
            message says how far off), a cost shape that does not match
            ``[M, N]``/``[B, M, N]``, non-finite costs, ``eps <= 0``,
            differing batch sizes or devices, ``max_iters < 1``, ``tol < 0``.
    """
    batch, M, N = _check_args(a, b, cost, eps, max_iters, tol)
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), cost.dtype)
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    size = batch or 1
    a = a.to(dtype).expand(size, M) if a.dim() == 1 else a.to(dtype)
    b = b.to(dtype).expand(size, N) if b.dim() == 1 else b.to(dtype)
    # Exact normalisation removes rounding error, so the balanced problem is feasible to any tol.
    a = a / a.sum(dim=1, keepdim=True)
    b = b / b.sum(dim=1, keepdim=True)
    cost = cost.to(dtype)
    cost = cost.unsqueeze(0) if cost.dim() == 2 else cost
    result = solve_batch(a, b, cost, float(eps), max_iters, float(tol), return_plan)
    if batch is not None:
        return result
    if return_plan:
        return result[0][0], result[1][0]
    return result[0]
