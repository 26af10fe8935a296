"""The contract of rcfast's fused loss kernels, and the ``torch.library`` glue they share.

Two layers, the second reusable by every fused loss op (dense, sparse top-k,
fused linear):

1. **Kernel facts** of the dense multi-head loss: the reduction codes (the one
   Python mapping; ``csrc/kd_math.h`` holds the C++ ``enum class``), the
   reduction's scale (:func:`reduction_scale`, the one Python home), the
   supported temperature range, and the op schema every backend registers::

       rcfast::<name>(Tensor student, Tensor teacher, Tensor head_offsets,
                      Tensor temperatures, Tensor weights, int reduction,
                      bool compute_grad) -> (Tensor loss, Tensor grad)

   Inputs (prepared by :mod:`rcfast.ops.multihead_kd`):

   - ``student``, ``teacher``: ``[B, N]`` contiguous packed logits, same dtype
     (float32, float16, bfloat16; the CPU kernel also takes float64), same device.
   - ``head_offsets``: int64 ``[H + 1]``, ``0 = o_0 < o_1 < ... < o_H = N``; head h
     is columns ``o_h .. o_{h+1}-1``. On the inputs' device.
   - ``temperatures``, ``weights``: float32 ``[H]`` on the inputs' device, each
     temperature in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``.
   - ``reduction``: one of :data:`REDUCTION_CODES`.
   - ``compute_grad``: whether to run pass 2 and write the gradient.

   Outputs:

   - ``loss``: float32 (float64 for float64 inputs). ``[B]`` for ``none``, else a
     scalar: the sum of per-row losses times :func:`reduction_scale`.
   - ``grad``: ``d loss / d student`` for an incoming gradient of 1, i.e.
     ``scale * w_h * tau_h * (softmax(s_h/tau_h) - softmax(t_h/tau_h))`` in the
     student's dtype, ``[B, N]``; an empty ``[0]`` tensor when ``compute_grad`` is
     false. For ``none`` the scale is 1 (per row). The gradient buffer belongs to
     autograd: callers of the raw op must not keep it across a backward (the
     backward may hand it out as the student's gradient, see below).

   Non-finite inputs follow :mod:`rcfast.ops.reference` exactly (masked classes,
   fully masked heads, NaN propagation).

2. **Autograd for fused losses** (:class:`FusedLossAutograd`,
   :func:`register_fused_loss`). A fused loss op returns ``(loss, *grad_buffers)``
   where each buffer is the gradient of the loss (for an incoming gradient of 1)
   with respect to one input, written by the forward kernel. The backward:

   - multiplies each buffer by the incoming gradient (a scalar, or one value per
     row for ``reduction="none"``); nothing is recomputed;
   - hands the buffer itself out as the input's gradient (no copy, no new
     allocation: scaled in place when the incoming gradient is not 1) only when
     that is provably safe: plain eager mode, the graph is not kept
     (``retain_graph``/``create_graph`` false, so autograd frees the saved buffer
     right after this backward and no later backward can read it, even though
     ``AccumulateGrad`` may steal the tensor into ``.grad`` and add into it in
     place), and not while building a graph (``create_graph``);
   - is differentiable: when a gradient reaches a buffer (a double backward,
     e.g. ``torch.autograd.grad(loss, s, create_graph=True)`` then a second
     grad), the op's Hessian-vector product supplies ``J_buffer^T v``. For the
     dense loss, per row and head (``p = softmax(s_h / tau_h)``, ``scale`` the
     reduction's)::

         d/ds <grad_h, v> = scale * w_h * (p * v - p * <p, v>)

     (``grad_h = scale w tau (p - q)`` and ``dp/ds = (diag p - p p^T) / tau``: the
     temperatures cancel). tests/test_kd_loss.py verifies it with
     ``torch.autograd.gradgradcheck`` in float64.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = [
    "REDUCTION_CODES", "REDUCTION_NAMES", "OP_SCHEMA", "MIN_TEMPERATURE", "MAX_TEMPERATURE",
    "reduction_scale", "check_temperature", "fake_kernel",
    "FusedLossAutograd", "register_fused_loss", "register_kernel_op_meta",
    "dense_kd_hessian_vector_product",
]

# The one Python mapping of reduction names to the codes of the ops' ``int reduction``
# (C++: enum class rcfast::kd::KDReduction in csrc/kd_math.h).
REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2, "batchmean": 3}
REDUCTION_NAMES = {code: name for name, code in REDUCTION_CODES.items()}

OP_SCHEMA = (
    "(Tensor student, Tensor teacher, Tensor head_offsets, Tensor temperatures, "
    "Tensor weights, int reduction, bool compute_grad) -> (Tensor, Tensor)"
)

# The supported temperatures, both ends included; multihead_kd_loss refuses others
# with a ValueError naming ``temperature``. Why these ends (docs/kernels.md has the
# measurements): the kernels compute in float32 with logits in their own units,
# so a small temperature can neither overflow logit / tau nor underflow tau**2;
# the lower end only keeps tau a normal float32 with a wide margin. Above the
# upper end the loss (not the gradient) loses float32 accuracy as tau**2 * eps:
# a KL of order 1/tau**2 is a small difference of two log-sum-exps of order log C.
MIN_TEMPERATURE = 1e-6
MAX_TEMPERATURE = 100.0


def reduction_scale(reduction: str | int, batch: int, num_heads: int) -> float:
    """d(reduced loss) / d(row loss): 1 for ``none`` and ``sum``, 1/B for
    ``batchmean``, 1/(B*H) for ``mean`` (the one Python home of this fact)."""
    name = REDUCTION_NAMES.get(reduction, reduction) if isinstance(reduction, int) else reduction
    if name in ("none", "sum"):
        return 1.0
    if name == "batchmean":
        return 1.0 / batch
    if name == "mean":
        return 1.0 / (batch * num_heads)
    raise ValueError(f"reduction must be one of {sorted(REDUCTION_CODES)}, got {reduction!r}")


def check_temperature(value, name: str = "temperature") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``MIN_TEMPERATURE <= value <= MAX_TEMPERATURE``.

    Written with comparisons only (NaN and inf fail them), so that it also works
    on a symbolic float under ``torch.compile(dynamic=True)``: there it becomes a
    guard, not a graph break.
    """
    if not (MIN_TEMPERATURE <= value <= MAX_TEMPERATURE):
        raise ValueError(
            f"{name} must be in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (the supported range; "
            f"see docs/kernels.md), got {value}")


def _loss_dtype(student_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if student_dtype == torch.float64 else torch.float32


def fake_kernel(student, teacher, head_offsets, temperatures, weights, reduction, compute_grad):
    """Shape/dtype-only implementation of the dense op, used by torch.compile and opcheck."""
    torch._check(student.dim() == 2, lambda: "student must be 2-D [B, N]")
    torch._check(teacher.shape == student.shape, lambda: "teacher must match student's shape")
    torch._check(head_offsets.dim() == 1, lambda: "head_offsets must be 1-D [H + 1]")
    num_heads = head_offsets.shape[0] - 1
    torch._check(temperatures.shape[0] == num_heads, lambda: "one temperature per head")
    torch._check(weights.shape[0] == num_heads, lambda: "one weight per head")
    loss_dtype = _loss_dtype(student.dtype)
    if reduction == REDUCTION_CODES["none"]:
        loss = student.new_empty((student.shape[0],), dtype=loss_dtype)
    else:
        loss = student.new_empty((), dtype=loss_dtype)
    grad = torch.empty_like(student) if compute_grad else student.new_empty((0,))
    return loss, grad


# --------------------------------------------------------------------------------------
# Autograd of fused losses (reusable by every fused loss op)
# --------------------------------------------------------------------------------------

HessianVectorProduct = Callable[[Sequence, Sequence], Sequence]


@dataclasses.dataclass(frozen=True)
class FusedLossAutograd:
    """How the autograd formula of one fused loss op is wired.

    The op returns ``(loss, *grad_buffers)``; ``grad_buffers[i]`` is the gradient
    of ``loss`` (incoming gradient 1) with respect to input ``grad_inputs[i]``.

    Attributes:
        num_inputs: how many inputs the op takes (tensors and non-tensors).
        grad_inputs: for each gradient buffer output, the index of its input.
        hessian_vector_product: ``hvp(inputs, vectors) -> contributions``: given
            all the op's inputs and, per buffer, the gradient ``v`` that reached
            it (or ``None``), return per buffer ``J_buffer^T v`` as a gradient of
            that buffer's input (or ``None``). Built from differentiable torch
            ops, so higher derivatives work too. ``None`` makes a double backward
            raise instead of being silently wrong.
        rowwise_loss: ``(inputs) -> bool``: whether the loss is per row (``[B]``,
            reduction ``none``), so an incoming ``[B]`` gradient scales the rows
            of every buffer. Buffers of such ops must be ``[B, ...]``.
    """

    num_inputs: int
    grad_inputs: tuple[int, ...]
    hessian_vector_product: HessianVectorProduct | None
    rowwise_loss: Callable[[Sequence], bool]


def _may_hand_over_buffers() -> bool:
    """Whether a gradient buffer may be handed out (or scaled in place) by this backward.

    Safe only when nothing can read the saved buffer after this backward: the
    autograd engine frees saved tensors after a backward that does not keep the
    graph, and ``create_graph`` (grad mode on in the backward) keeps it. Under
    tracing (torch.compile, fake tensors, dispatch modes) the plain formula is
    always used.
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return not torch._C._autograd._get_current_graph_task_keep_graph()


def _apply_incoming_gradient(buffer: torch.Tensor, grad_loss: torch.Tensor, rowwise: bool, hand_over: bool):
    """``buffer * grad_loss`` (rows scaled for a per-row loss), without a copy when ``hand_over``."""
    if rowwise:
        factor = grad_loss.reshape((-1,) + (1,) * (buffer.dim() - 1))
    else:
        factor = grad_loss
    if not hand_over:
        return buffer * factor.to(buffer.dtype)
    # Reading the value is free only for a plain CPU tensor (a host sync on a GPU):
    # skip even the in-place multiply when the incoming gradient is exactly 1,
    # which is what loss.backward() passes.
    if grad_loss.dim() == 0 and type(grad_loss) is torch.Tensor and grad_loss.device.type == "cpu":
        if grad_loss.item() == 1.0:
            return buffer
    return buffer.mul_(factor)


def _make_autograd(spec: FusedLossAutograd):
    def setup_context(ctx, inputs, output):
        buffers = output[1:]
        ctx.spec = spec
        ctx.rowwise = spec.rowwise_loss(inputs)
        tensor_positions = [i for i, value in enumerate(inputs) if isinstance(value, torch.Tensor)]
        ctx.tensor_positions = tensor_positions
        ctx.non_tensor_inputs = {i: value for i, value in enumerate(inputs) if not isinstance(value, torch.Tensor)}
        # The inputs are saved as references (no copies) for a double backward; the
        # buffers are what the first backward hands on.
        ctx.save_for_backward(*buffers, *(inputs[i] for i in tensor_positions))
        ctx.num_buffers = len(buffers)
        # Outputs other than the loss get a gradient only in a double backward; do
        # not let autograd allocate and zero a buffer-sized tensor for them otherwise.
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, *grad_buffers):
        saved = ctx.saved_tensors
        buffers = saved[: ctx.num_buffers]
        grads = [None] * spec.num_inputs
        if grad_loss is not None:
            if any(b.numel() == 0 for b in buffers) and grad_loss.numel() != 0:
                raise RuntimeError(
                    "rcfast: the loss was computed without its gradient (compute_grad=False) "
                    "but a backward pass reached it")
            hand_over = _may_hand_over_buffers()
            for buffer, index in zip(buffers, spec.grad_inputs):
                grads[index] = _apply_incoming_gradient(buffer, grad_loss, ctx.rowwise, hand_over)
        if any(v is not None for v in grad_buffers):
            if spec.hessian_vector_product is None:
                raise RuntimeError("rcfast: this fused loss has no second derivative (double backward)")
            inputs = [None] * spec.num_inputs
            for position, tensor in zip(ctx.tensor_positions, saved[ctx.num_buffers:]):
                inputs[position] = tensor
            for position, value in ctx.non_tensor_inputs.items():
                inputs[position] = value
            contributions = spec.hessian_vector_product(inputs, grad_buffers)
            for contribution, index in zip(contributions, spec.grad_inputs):
                if contribution is not None:
                    grads[index] = contribution if grads[index] is None else grads[index] + contribution
        return tuple(grads)

    return backward, setup_context


def register_fused_loss(qualname: str, spec: FusedLossAutograd, fake: Callable | None = None) -> None:
    """Register ``qualname``'s autograd formula (see :class:`FusedLossAutograd`) and,
    when given, its fake (meta) implementation. Ops built with
    ``torch.library.triton_op`` pass no ``fake``: torch.compile traces into them."""
    if fake is not None:
        torch.library.register_fake(qualname)(fake)
    backward, setup_context = _make_autograd(spec)
    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


# --------------------------------------------------------------------------------------
# The dense multi-head loss
# --------------------------------------------------------------------------------------

def dense_kd_hessian_vector_product(inputs, vectors):
    """``J_grad^T v`` of the dense op (module docstring): differentiable torch ops.

    Heads are handled together through a column -> head index (no host sync, no
    loop over heads). Degenerate heads follow the first derivative: a head whose
    teacher is masked everywhere has a constant (zero) gradient, so 0 here; a head
    whose student is -inf everywhere has an unspecified gradient, taken as 0; NaN
    or +inf in the head's logits gives NaN.
    """
    student, teacher, head_offsets, temperatures, weights, reduction, _ = inputs
    (vector,) = vectors
    if vector is None:
        return (None,)
    batch, num_cols = student.shape
    num_heads = head_offsets.shape[0] - 1
    compute_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    columns = torch.arange(num_cols, device=student.device)
    head_of_col = torch.searchsorted(head_offsets[1:], columns, right=True)
    index = head_of_col.expand(batch, num_cols)

    def per_head_sum(values):  # [B, N] -> [B, H]
        out = values.new_zeros((batch, num_heads))
        return out.index_add(1, head_of_col, values)

    def per_head_any(mask):  # [B, N] bool -> [B, H] bool
        return per_head_sum(mask.to(compute_dtype)) > 0

    s = student.to(compute_dtype)
    t = teacher.to(compute_dtype)
    # NaN, or a +inf logit (no softmax), on either side: the gradient is NaN there.
    nan_head = per_head_any(torch.isnan(s) | torch.isposinf(s)) | per_head_any(torch.isnan(t) | torch.isposinf(t))
    teacher_masked = ~per_head_any(~torch.isneginf(t))
    student_empty = ~per_head_any(~torch.isneginf(s))
    # A softmax per (row, head), in logit units (no overflow of s / tau): shift by the
    # head's max (a constant for the derivative), then divide.
    finite_s = torch.where(torch.isfinite(s), s, torch.finfo(compute_dtype).min)
    head_max = torch.full((batch, num_heads), torch.finfo(compute_dtype).min, dtype=compute_dtype,
                          device=student.device)
    head_max = head_max.scatter_reduce(1, index, finite_s.detach(), reduce="amax")
    shifted = torch.where(torch.isfinite(s), s - head_max.gather(1, index), float("-inf"))
    exps = torch.exp(shifted / temperatures.to(compute_dtype)[head_of_col])
    p = exps / per_head_sum(exps).clamp_min(torch.finfo(compute_dtype).tiny).gather(1, index)
    v = vector.to(compute_dtype)
    p_dot_v = per_head_sum(p * v).gather(1, index)
    scale = reduction_scale(reduction, batch, num_heads)
    result = (scale * weights.to(compute_dtype)[head_of_col]) * (p * v - p * p_dot_v)
    zero_head = (teacher_masked | student_empty).gather(1, index)
    result = torch.where(zero_head, 0.0, result)
    result = torch.where(nan_head.gather(1, index), float("nan"), result)
    return (result.to(student.dtype),)


DENSE_KD_AUTOGRAD = FusedLossAutograd(
    num_inputs=7,
    grad_inputs=(0,),
    hessian_vector_product=dense_kd_hessian_vector_product,
    rowwise_loss=lambda inputs: inputs[5] == REDUCTION_CODES["none"],
)


def register_kernel_op_meta(qualname: str, *, register_fake: bool = True) -> None:
    """Register the dense op's fake implementation and autograd formula for ``qualname``.

    ``register_fake`` is False for ops built with ``torch.library.triton_op``,
    which torch.compile traces through directly.
    """
    register_fused_loss(qualname, DENSE_KD_AUTOGRAD, fake=fake_kernel if register_fake else None)
