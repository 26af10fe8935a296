"""What is specific to the Triton backend (``rcfast.kernels.kd_loss`` + ``rcfast.ops.triton_backend``).

The shared matrix (tests/test_kd_loss.py) already checks ``triton`` against the
reference on ordinary shapes. This file covers the kernel's own machinery: tiles
(prologue / vector body / tail), heads wider than one tile with a moving max,
many heads of different widths in one launch, the split-classes path for wide
heads with few rows, the launch heuristic, degenerate ``-inf`` / NaN inputs on
every path, determinism, no host synchronisation, the CPU-without-interpreter
error, ``torch.compile`` and ``torch.library.opcheck``.

On a machine without a GPU it runs under ``TRITON_INTERPRET=1`` (set by
conftest.py), so shapes stay small.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rcfast
from rcfast.ops.backends import unavailable_reason
from rcfast.ops.kernel_contract import REDUCTION_CODES

if unavailable_reason("triton") is not None:
    pytest.skip(f"triton backend unavailable: {unavailable_reason('triton')}", allow_module_level=True)

from rcfast.ops import triton_backend  # noqa: E402  (after the availability check)

from helpers.kd_compare import REDUCTIONS, loss_and_grad  # noqa: E402
from helpers.kd_compare import assert_compiled_matches_eager  # noqa: E402
from helpers.kd_compare import assert_matches_reference as _assert_matches_reference  # noqa: E402
from helpers.kd_compare import make_logits as _make_logits  # noqa: E402

kd_loss = triton_backend.kd_loss
# Without a GPU every test here runs the kernels in Triton's interpreter; on a GPU
# machine they run the compiled kernels on CUDA tensors, and `pytest -m gpu` selects them.
pytestmark = [pytest.mark.interpreter] if triton_backend.kernels_are_interpreted() else [pytest.mark.gpu]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_logits(*args, **kwargs):
    """Random logits on the Triton backend's device (see helpers.kd_compare.make_logits)."""
    return _make_logits(*args, device=DEVICE, **kwargs)


def assert_matches_reference(student, teacher, upstream=None, **kwargs):
    return _assert_matches_reference("triton", student, teacher, upstream, **kwargs)


def op_args(student, teacher, head_sizes, temperatures, weights, reduction, compute_grad):
    """The op's arguments (tables on the device, the reduction's code)."""
    offsets = [0]
    for c in head_sizes:
        offsets.append(offsets[-1] + c)
    return (student, teacher, torch.tensor(offsets, device=DEVICE),
            torch.tensor(temperatures, dtype=torch.float32, device=DEVICE),
            torch.tensor(weights, dtype=torch.float32, device=DEVICE),
            REDUCTION_CODES[reduction], compute_grad)


@pytest.fixture
def launches(monkeypatch):
    """Record every kernel launch of kd_loss as ``(kernel name, grid, constexprs)``."""
    recorded = []
    real_wrap = kd_loss.wrap_triton

    def recording_wrap(kernel):
        launcher = real_wrap(kernel)
        name = getattr(kernel, "__name__", None) or kernel.fn.__name__

        class Recorder:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    recorded.append((name, tuple(grid), {k: v for k, v in kwargs.items() if k.isupper()}))
                    return launcher[grid](*args, **kwargs)
                return launch
        return Recorder()

    monkeypatch.setattr(kd_loss, "wrap_triton", recording_wrap)
    return recorded


@pytest.fixture
def small_tiles():
    """64-wide tiles for calls through the public API (kd_loss.launch_settings), so that
    small heads span several tiles: prologues, vector bodies and tails all run."""
    with kd_loss.launch_settings(max_block=64):
        yield


@pytest.fixture
def force_split():
    """``force_split()`` makes the split path kick in for small shapes, through the
    public API: any head >= 2 tiles of 64 splits (kd_loss.launch_settings)."""
    with contextlib.ExitStack() as stack:
        def apply(min_cols_per_split=64, target_programs=64, max_splits=64):
            policy = kd_loss.SplitPolicy(min_cols_per_split=min_cols_per_split, max_splits=max_splits,
                                         target_programs=target_programs)
            # Small tiles too, so that a chunk spans several tiles.
            stack.enter_context(kd_loss.launch_settings(policy=policy, max_block=64))
        yield apply


# ---- tiles, heads, launches ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_head_wider_than_one_block_with_moving_max(small_tiles, launches, dtype):
    # 64-wide tiles over a 1000-class head: 15 vector-body tiles, a masked tail, and a
    # max that grows at every tile (ramp), so every rescaling step is exercised.
    student, teacher = make_logits(3, (1000,), dtype, seed=1, ramp=40.0)
    assert_matches_reference(student, teacher, temperature=1.5)
    assert [(name, consts["BLOCK"]) for name, _, consts in launches] == [("_kd_fused_kernel", 64)]


def test_head_wider_than_max_block_default_heuristic(launches):
    student, teacher = make_logits(2, (9000,), torch.float32, seed=2, ramp=10.0)
    assert_matches_reference(student, teacher, temperature=2.0)
    (name, grid, consts), = launches
    assert consts["BLOCK"] == kd_loss.MAX_BLOCK == 4096  # 9000 classes: 2 body tiles + a tail


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_heads_of_different_widths_in_one_launch(launches, dtype):
    head_sizes = (1, 2, 7, 300, 33, 1000, 17)
    student, teacher = make_logits(5, head_sizes, dtype, seed=3)  # odd batch
    assert_matches_reference(student, teacher, splits=list(head_sizes),
                             temperature=[1.0, 2.0, 0.5, 4.0, 3.0, 1.0, 8.0],
                             weights=[1.0, 0.5, 2.0, 0.0, 1.0, 3.0, 0.25])
    # One launch for every head: grid (rows, heads), heads looked up in the device table.
    assert [(name, grid) for name, grid, _ in launches] == [("_kd_fused_kernel", (5, len(head_sizes)))]


def test_rows_and_heads_start_unaligned(small_tiles):
    # N = 1693 (odd) and heads starting at odd columns: every row and head starts at a
    # different offset modulo the 16-element alignment, so prologues of every length run.
    head_sizes = (1000, 196, 100, 397)
    student, teacher = make_logits(3, head_sizes, torch.bfloat16, seed=4)
    assert_matches_reference(student, teacher, splits=list(head_sizes), temperature=[4.0, 2.0, 1.0, 3.0])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions_with_upstream_gradient(reduction):
    student, teacher = make_logits(5, (13, 70), torch.float32, seed=5)
    upstream = (torch.tensor([0.5, -2.0, 0.0, 3.0, 1.0], device=DEVICE) if reduction == "none"
                else torch.tensor(-1.7, device=DEVICE))
    loss, _ = assert_matches_reference(student, teacher, upstream=upstream, splits=[13, 70], reduction=reduction)
    assert loss.shape == ((5,) if reduction == "none" else ())


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_op_outputs_follow_the_contract(reduction):
    student, teacher = make_logits(3, (5, 9), torch.bfloat16, seed=6)
    args = op_args(student, teacher, (5, 9), [2.0, 3.0], [1.0, 0.5], reduction, True)
    loss, grad = triton_backend.multihead_kd_fwd_triton(*args)
    assert loss.dtype == torch.float32 and loss.shape == ((3,) if reduction == "none" else ())
    assert grad.dtype == torch.bfloat16 and grad.shape == student.shape
    no_grad_loss, empty = triton_backend.multihead_kd_fwd_triton(*args[:-1], False)
    assert empty.shape == (0,)
    assert torch.equal(no_grad_loss, loss)  # pass 1 alone gives the same loss, bit for bit


# ---- the split-classes path --------------------------------------------------------------------

@pytest.mark.parametrize("dtype,reduction", [(torch.float32, "batchmean"), (torch.float16, "none"),
                                             (torch.bfloat16, "mean"), (torch.float32, "sum")],
                         ids=["fp32-batchmean", "fp16-none", "bf16-mean", "fp32-sum"])
def test_split_path_matches_reference(force_split, launches, dtype, reduction):
    force_split()
    head_sizes = (700, 3, 130)  # a wide head, a head narrower than one chunk, a mid one
    student, teacher = make_logits(2, head_sizes, dtype, seed=7, ramp=20.0)
    config = kd_loss.launch_config(2, sum(head_sizes), 3, student.device)
    assert config.num_splits > 1
    assert_matches_reference(student, teacher, splits=list(head_sizes), temperature=[2.0, 1.0, 4.0],
                             weights=[1.0, 2.0, 0.5], reduction=reduction)
    assert [(name, grid) for name, grid, _ in launches] == [
        ("_kd_partial_stats_kernel", (2, 3, config.num_splits)),  # per (row, head, chunk)
        ("_kd_merge_kernel", (2, 3)),                              # per (row, head)
        ("_kd_split_grad_kernel", (2, 3, config.num_splits)),
    ]


def test_split_path_equals_fused_path(force_split):
    student, teacher = make_logits(2, (900, 40), torch.float32, seed=8)
    fused_loss, fused_grad = loss_and_grad("triton", student, teacher, splits=[900, 40], reduction="none")
    force_split()
    split_loss, split_grad = loss_and_grad("triton", student, teacher, splits=[900, 40], reduction="none")
    torch.testing.assert_close(split_loss, fused_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split_grad, fused_grad, rtol=1e-5, atol=1e-7)


def test_split_path_degenerate_inputs(force_split):
    """-inf and NaN on the split path: whole chunks masked, degenerate heads, NaN."""
    force_split()
    student, teacher = make_logits(6, (500, 20), torch.float32, seed=9)
    teacher[0, 0:300] = float("-inf")  # whole chunks without teacher mass
    student[0, 0:300] = float("-inf")  # ... and the student masked there too: adds nothing
    teacher[1, :500] = float("-inf")  # head 0: no teacher distribution -> 0, gradient 0
    student[2, 100] = float("-inf")  # student -inf under teacher mass -> +inf
    student[3, :500] = float("-inf")  # student -inf everywhere in head 0 -> +inf
    student[4, 450] = float("nan")  # NaN in -> NaN out
    teacher[5, 10] = float("nan")
    loss, grad = loss_and_grad("triton", student, teacher, splits=[500, 20], reduction="none")
    ref_loss, ref_grad = loss_and_grad("reference", student, teacher, splits=[500, 20], reduction="none")
    assert torch.isfinite(loss[:2]).all()
    assert loss[2] == float("inf") and loss[3] == float("inf")
    assert torch.isnan(loss[4]) and torch.isnan(loss[5])
    torch.testing.assert_close(loss[:2], ref_loss[:2], rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(grad[:3], ref_grad[:3], rtol=2e-5, atol=1e-6)
    assert (grad[1, :500] == 0).all()
    # Student -inf everywhere: the contract's gradient is -w * tau * p_t (batchmean scale 1 for none).
    p_teacher = torch.softmax(teacher[3, :500] / 4.0, dim=0)
    torch.testing.assert_close(grad[3, :500], -4.0 * p_teacher, rtol=2e-5, atol=1e-7)


# ---- -inf / NaN on the fused path, at tile boundaries ------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_masks_across_tiles(small_tiles, dtype):
    student, teacher = make_logits(5, (3, 333), dtype, seed=10, ramp=8.0)
    teacher[0, 3:70] = float("-inf")  # a prologue and a whole body tile without mass
    student[0, 3:70] = float("-inf")
    teacher[1, 300:] = float("-inf")  # the tail masked
    teacher[2, :3] = float("-inf")  # head 0 fully masked: adds nothing
    student[2, 100] = float("-inf")
    teacher[2, 100] = float("-inf")
    teacher[3, 200] = float("-inf")
    student[4, 5:336:7] = float("-inf")  # student-only masks under teacher mass are inf:
    loss, grad = assert_matches_reference(student[:4], teacher[:4], splits=[3, 333], reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad.float()).all()
    assert (grad[2, :3] == 0).all()
    inf_loss, inf_grad = loss_and_grad("triton", student[4:], teacher[4:], splits=[3, 333], reduction="none")
    assert inf_loss[0] == float("inf") and torch.isfinite(inf_grad.float()).all()


def test_student_head_all_minus_inf(small_tiles):
    student, teacher = make_logits(2, (150, 9), torch.float32, seed=11)
    student[0, :150] = float("-inf")
    loss, grad = loss_and_grad("triton", student, teacher, splits=[150, 9], reduction="none", temperature=2.0)
    assert loss[0] == float("inf") and torch.isfinite(loss[1])
    torch.testing.assert_close(grad[0, :150], -2.0 * torch.softmax(teacher[0, :150] / 2.0, 0),
                               rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("column", [0, 70, 140])  # prologue/body/tail of 64-wide tiles at row offset 150
def test_nan_in_every_segment(small_tiles, where, column):
    student, teacher = make_logits(3, (150,), torch.float32, seed=12)
    (student if where == "student" else teacher)[1, column] = float("nan")
    loss, _ = loss_and_grad("triton", student, teacher, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


# ---- launch heuristic ----------------------------------------------------------------------------

@pytest.mark.parametrize("width,block,warps", [
    (1, 64, 1), (100, 128, 1), (1000, 1024, 2), (1693, 2048, 4), (4096, 4096, 8), (256_000, 4096, 8),
])
def test_block_and_warps(width, block, warps):
    assert kd_loss.block_and_warps(width) == (block, warps)


def test_launch_settings_are_scoped():
    """launch_settings changes the defaults inside its block only (no module global is set)."""
    before = kd_loss.launch_config(2, 100_000, 1, torch.device("cpu"))
    with kd_loss.launch_settings(policy=kd_loss.SplitPolicy(target_programs=64), max_block=64):
        inside = kd_loss.launch_config(2, 100_000, 1, torch.device("cpu"))
    after = kd_loss.launch_config(2, 100_000, 1, torch.device("cpu"))
    assert inside.block == 64 and inside.num_splits > 1
    assert before == after == kd_loss.LaunchConfig(block=kd_loss.MAX_BLOCK, num_warps=8, num_splits=1)


def test_explicit_launch_config_matches_default():
    """kd_head_losses takes a LaunchConfig: every split count and tile gives the same
    losses and gradient as the default launch."""
    student, teacher = make_logits(2, (500, 9), torch.float32, seed=17, ramp=30.0)
    args = op_args(student, teacher, (500, 9), [2.0, 0.5], [1.0, 3.0], "none", True)[:5]
    expected_losses, expected_grad = kd_loss.kd_head_losses(*args, 0.25, True)
    for config in (kd_loss.LaunchConfig(64, 1, 1), kd_loss.LaunchConfig(64, 1, 3), kd_loss.LaunchConfig(128, 1, 8)):
        losses, grad = kd_loss.kd_head_losses(*args, 0.25, True, config=config)
        torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_launch_config_bounds_the_widest_head_from_shapes():
    # No device value is read: the widest head is bounded by N - (H - 1).
    config = kd_loss.launch_config(8, 1000 + 196 + 100 + 397, 4, torch.device("cpu"))
    assert (config.block, config.num_warps, config.num_splits) == (2048, 4, 1)


def test_launch_config_splits_wide_heads_with_few_rows(monkeypatch):
    monkeypatch.setattr(kd_loss, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    # 2 rows x 1 head of 256k classes: 2 programs for 132 SMs -> split, each chunk
    # keeping >= 16k classes (256000 // 16384 = 15 chunks at most).
    assert kd_loss.launch_config(2, 256_000, 1, cuda).num_splits == 15
    # 64 rows: 64 programs < 4 x 132 -> ceil(528 / 64) = 9 chunks.
    assert kd_loss.launch_config(64, 256_000, 1, cuda).num_splits == 9
    # Enough rows to fill the GPU, or heads too narrow to cut: no split.
    assert kd_loss.launch_config(4096, 256_000, 1, cuda).num_splits == 1
    assert kd_loss.launch_config(2, 20_000, 1, cuda).num_splits == 1
    # The interpreter (CPU tensors) never splits by default: it runs programs one at a time.
    assert kd_loss.launch_config(1, 256_000, 1, torch.device("cpu")).num_splits == 1


# ---- reproducibility and no host synchronisation ------------------------------------------------------

def test_deterministic(force_split):
    student, teacher = make_logits(3, (200, 50), torch.bfloat16, seed=13)
    first = loss_and_grad("triton", student, teacher, splits=[200, 50])
    second = loss_and_grad("triton", student, teacher, splits=[200, 50])
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    force_split()
    first = loss_and_grad("triton", student, teacher, splits=[200, 50])
    second = loss_and_grad("triton", student, teacher, splits=[200, 50])
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


class _SyncRecorder(TorchDispatchMode):
    """Records ops that copy a device value to the host (what .item(), bool(t), torch.equal do)."""

    SYNC_OPS = {"aten::_local_scalar_dense", "aten::equal", "aten::is_nonzero", "aten::item"}

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNC_OPS:
            self.syncs.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("split", [False, True])
def test_no_host_synchronisation(force_split, split):
    if split:
        force_split()
    student, teacher = make_logits(2, (300, 20), torch.float32, seed=14)
    args = op_args(student, teacher, (300, 20), [2.0, 1.0], [1.0, 1.0], "batchmean", True)
    recorder = _SyncRecorder()
    with recorder:
        kd_loss.kd_head_losses(*args[:5], 0.5, True)
    assert recorder.syncs == []


# ---- dispatch -----------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, triton on CPU tensors is another path")
def test_cpu_tensors_without_interpreter_raise():
    code = textwrap.dedent("""
        import torch, rcfast
        assert "triton" not in rcfast.available_backends(), rcfast.available_backends()
        try:
            rcfast.multihead_kd_loss(torch.randn(2, 5), torch.randn(2, 5), backend="triton")
        except (RuntimeError, ValueError) as exc:
            assert "TRITON_INTERPRET" in str(exc), exc
        else:
            raise SystemExit("backend='triton' ran on CPU tensors without the interpreter")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr + result.stdout


# ---- torch.compile and opcheck -----------------------------------------------------------------------

@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    """Under the interpreter the op is opaque to tracing (see rcfast.ops.triton_backend);
    Inductor then calls it as an extern kernel. On a GPU Inductor sees the kernels."""
    student, teacher = make_logits(5, (7, 30), torch.float32, seed=15)

    def step(s, t):
        return rcfast.multihead_kd_loss(s, t, splits=[7, 30], temperature=[2.0, 4.0], backend="triton") * 2.0

    torch._dynamo.reset()
    assert_compiled_matches_eager(step, student, teacher, backend=compile_backend)


@pytest.mark.parametrize("case", ["fused-bf16-none", "fused-fp32-batchmean-nograd", "split-fp32-mean"])
def test_opcheck(force_split, case):
    path, dtype_name, reduction, *nograd = case.split("-")
    if path == "split":
        force_split()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    student, teacher = make_logits(3, (150, 9), dtype, seed=16)
    compute_grad = not nograd
    student.requires_grad_(compute_grad)
    args = op_args(student, teacher, (150, 9), [2.0, 3.0], [1.0, 0.5], reduction, compute_grad)
    torch.library.opcheck(triton_backend.multihead_kd_fwd_triton, args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real compile tests above cover this")
def test_gpu_path_decomposes_into_triton_kernels():
    """Without the interpreter, AOTAutograd traces into the triton_op: the launches
    become ``triton_kernel_wrapper_functional`` nodes next to the torch reduction ops,
    which is what lets Inductor schedule them on a GPU. Only tracing runs here (fake
    tensors, no GPU needed); the captured graph is never executed."""
    code = textwrap.dedent("""
        import torch
        from functorch.compile import aot_function
        import rcfast.ops.triton_backend as tb
        from rcfast.kernels import kd_loss
        assert not tb.kernels_are_interpreted()
        found = torch._library.triton.get_triton_kernels_for_op(tb.QUALNAME)
        assert {k.fn.__name__ for k in found} == {
            "_kd_fused_kernel", "_kd_partial_stats_kernel", "_kd_merge_kernel", "_kd_split_grad_kernel"}, found

        class Captured(Exception):
            pass

        graphs = []
        def capture(gm, example_inputs):
            graphs.append(gm.code)
            raise Captured

        def loss(s, t, offsets, temperatures, weights):
            return tb.multihead_kd_fwd_triton(s, t, offsets, temperatures, weights, 3, True)[0] * 2

        args = (torch.randn(3, 37), torch.randn(3, 37), torch.tensor([0, 7, 37]),
                torch.tensor([2.0, 4.0]), torch.ones(2))
        for policy in (kd_loss.SplitPolicy(), kd_loss.SplitPolicy(min_cols_per_split=8, target_programs=64)):
            with kd_loss.launch_settings(policy=policy):
                try:
                    aot_function(loss, fw_compiler=capture)(*args)
                except Captured:
                    pass
        fused, split = graphs
        assert fused.count("triton_kernel_wrapper_functional(") == 1, fused
        assert "kernel_idx" in fused and "aten.sum" in fused, fused
        assert split.count("triton_kernel_wrapper_functional(") == 3, split
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-4000:] + result.stdout
