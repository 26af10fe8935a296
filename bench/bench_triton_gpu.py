"""GPU benchmark of the fused multi-head KD loss (Triton and CUDA kernels) against eager, torch.compile and Liger-Kernel.

Needs a CUDA GPU (skipped otherwise: the Triton interpreter is never
benchmarked). Two ways to run it:

    python bench/bench_triton_gpu.py [--quick]      # writes bench/results/kd_loss_gpu.md
    pytest bench/bench_triton_gpu.py --benchmark-only  # pytest-benchmark, same cases

Variants, all computing ``sum_h tau_h**2 * KL(softmax(t_h/tau_h) || softmax(s_h/tau_h))``
with batchmean over packed ``[B, sum C_h]`` logits, forward + backward to the student:

- ``triton``: ``rcfast.multihead_kd_loss(..., backend="triton")``;
- ``cuda``: the same with ``backend="cuda"`` (the CUDA C++ kernel; only when rcfast
  was built with CUDA);
- ``eager``: what a PyTorch user writes: per head ``F.kl_div(log_softmax(s/tau),
  log_softmax(t/tau), log_target=True, reduction="batchmean") * tau**2``, summed;
- ``compile``: that function under ``torch.compile(fullgraph=True)`` (Inductor);
- ``liger``: per head, eager ``log_softmax`` then Liger-Kernel's ``LigerKLDIVLoss``
  (only when ``liger_kernel`` is importable).

Bytes-moved model (what the kernel must move at the least, see docs/triton.md),
with ``e`` the element size and ``B*N`` the logits:

- forward with gradient: pass 1 reads s and t, pass 2 reads them again and
  writes the gradient: ``5 * B * N * e``;
- backward: the registered formula multiplies the saved gradient by the incoming
  one (on a GPU the incoming gradient is a device value, so it is never checked
  for 1 without a sync): reads and writes ``B * N``: ``2 * B * N * e``;
- forward without gradient (``torch.no_grad``): pass 1 only, ``2 * B * N * e``.

Achieved bandwidth = bytes / time, reported against the peak measured in the
same run as a device-to-device copy (``dst.copy_(src)`` of 1 GiB: read + write).
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import rcfast  # noqa: E402

RESULTS = REPO / "bench" / "results" / "kd_loss_gpu.md"
TEMPERATURE = 4.0

# (name, batch, head sizes, dtype)
MAIN_CASES = [
    ("repcon-4heads-bf16", 1024, (1000, 196, 100, 397), torch.bfloat16),
    ("repcon-4heads-fp32", 1024, (1000, 196, 100, 397), torch.float32),
    ("llm-2x32000-bf16", 4096, (32000, 32000), torch.bfloat16),
]
# One head, width swept 1k..256k, rows chosen for ~2**26 logits per tensor (few rows
# at 256k: the split path's regime).
SWEEP_WIDTHS = [1000, 4096, 16_384, 32_000, 65_536, 131_072, 256_000]
SWEEP_DTYPE = torch.bfloat16


def sweep_cases():
    return [(f"sweep-{c}-bf16", max(1, (1 << 26) // c), (c,), SWEEP_DTYPE) for c in SWEEP_WIDTHS]


def eager_kd(student, teacher, head_sizes, temperature=TEMPERATURE):
    total = 0.0
    for s, t in zip(student.split(head_sizes, dim=1), teacher.split(head_sizes, dim=1)):
        total = total + F.kl_div(
            F.log_softmax(s.float() / temperature, dim=1), F.log_softmax(t.float() / temperature, dim=1),
            log_target=True, reduction="batchmean") * temperature ** 2
    return total


def make_liger():
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except ImportError:
        return None
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def liger_kd(student, teacher, head_sizes, temperature=TEMPERATURE):
        total = 0.0
        for s, t in zip(student.split(head_sizes, dim=1), teacher.split(head_sizes, dim=1)):
            # Liger's kernel takes log-probabilities: the softmaxes stay eager.
            total = total + kl(F.log_softmax(s.float() / temperature, dim=1),
                               F.log_softmax(t.float() / temperature, dim=1)) * temperature ** 2
        return total
    return liger_kd


def variants():
    compiled = torch.compile(eager_kd, fullgraph=True)
    out = {
        "triton": lambda s, t, h: rcfast.multihead_kd_loss(s, t, splits=list(h), temperature=TEMPERATURE,
                                                           backend="triton"),
        "eager": eager_kd,
        "compile": compiled,
    }
    if "cuda" in rcfast.available_backends():  # the CUDA C++ kernel, when rcfast was built with CUDA
        out["cuda"] = lambda s, t, h: rcfast.multihead_kd_loss(s, t, splits=list(h), temperature=TEMPERATURE,
                                                               backend="cuda")
    liger = make_liger()
    if liger is not None:
        out["liger"] = liger
    return out


def make_inputs(batch, head_sizes, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = sum(head_sizes)
    student = (torch.randn(batch, n, device="cuda", generator=g) * 3).to(dtype).requires_grad_(True)
    teacher = (torch.randn(batch, n, device="cuda", generator=g) * 3).to(dtype)
    return student, teacher


def bytes_moved(batch, head_sizes, dtype, mode):
    elements = batch * sum(head_sizes)
    size = torch.finfo(dtype).bits // 8
    return {"fwd+bwd": 7, "fwd": 2}[mode] * elements * size


def time_ms(fn, grad_to_none=None):
    """Median time of ``fn`` in ms (triton.testing.do_bench: L2 flushed between runs)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")


def copy_bandwidth_gbs():
    """Peak HBM bandwidth as this run sees it: a 1 GiB device-to-device copy (read + write)."""
    numel = (1 << 30) // 4
    src = torch.empty(numel, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def check_agreement(fns, student, teacher, head_sizes):
    """Do not time a wrong kernel: every variant's loss must match eager's."""
    with torch.no_grad():
        expected = eager_kd(student, teacher, head_sizes)
        for name, fn in fns.items():
            got = fn(student, teacher, head_sizes)
            torch.testing.assert_close(got.float(), expected.float(), rtol=2e-3, atol=1e-3,
                                       msg=lambda m, name=name: f"{name}: {m}")


def run_case(fns, batch, head_sizes, dtype):
    student, teacher = make_inputs(batch, head_sizes, dtype)
    check_agreement(fns, student, teacher, head_sizes)
    rows = {}
    for name, fn in fns.items():
        fwd_bwd = time_ms(lambda: fn(student, teacher, head_sizes).backward(), grad_to_none=[student])
        with torch.no_grad():
            fwd = time_ms(lambda: fn(student, teacher, head_sizes))
        rows[name] = {"fwd+bwd": fwd_bwd, "fwd": fwd}
    return rows


def format_report(results, peak_gbs):
    props = torch.cuda.get_device_properties(0)
    import triton
    lines = [
        "# Fused multi-head KD loss on GPU (Triton and CUDA kernels)",
        "",
        f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}; "
        f"{datetime.date.today().isoformat()}. Produced by `python bench/bench_triton_gpu.py`.",
        "",
        f"Peak bandwidth measured as a device-to-device copy in this run: **{peak_gbs:.0f} GB/s**.",
        "Bytes moved (docs/triton.md): fwd+bwd `7*B*N*e`, fwd without grad `2*B*N*e`.",
        "",
        "| case | B | heads | variant | fwd+bwd ms | fwd+bwd GB/s | % of copy BW | fwd ms | fwd % of copy BW "
        "| vs eager | vs compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (case, batch, head_sizes, dtype), rows in results:
        for name, t in rows.items():
            gbs = bytes_moved(batch, head_sizes, dtype, "fwd+bwd") / (t["fwd+bwd"] * 1e-3) / 1e9
            fwd_gbs = bytes_moved(batch, head_sizes, dtype, "fwd") / (t["fwd"] * 1e-3) / 1e9
            vs_eager = rows["eager"]["fwd+bwd"] / t["fwd+bwd"]
            vs_compile = rows["compile"]["fwd+bwd"] / t["fwd+bwd"]
            heads = "+".join(map(str, head_sizes))
            lines.append(
                f"| {case} | {batch} | {heads} | {name} | {t['fwd+bwd']:.3f} | {gbs:.0f} | {100 * gbs / peak_gbs:.0f}% "
                f"| {t['fwd']:.3f} | {100 * fwd_gbs / peak_gbs:.0f}% | {vs_eager:.2f}x | {vs_compile:.2f}x |")
    lines += [
        "",
        "Bandwidth columns apply the fused kernel's bytes model to every variant, so for eager, "
        "compile and liger they read as 'equivalent bandwidth' (those variants move more bytes).",
        "",
        "Targets (docs/triton.md): triton >= 80% of copy bandwidth for heads >= 4k classes, "
        ">= 3x eager and >= 1.3x torch.compile.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="main cases only, no width sweep")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_triton_gpu.py needs a CUDA GPU (the Triton interpreter is not benchmarked)")
    if "triton" not in rcfast.available_backends():
        raise SystemExit(f"triton backend unavailable: {rcfast.ops.backends.unavailable_reason('triton')}")
    fns = variants()
    peak = copy_bandwidth_gbs()
    cases = MAIN_CASES + ([] if args.quick else sweep_cases())
    results = []
    for case in cases:
        name, batch, head_sizes, dtype = case
        print(f"{name}: B={batch} heads={head_sizes} {dtype}", flush=True)
        results.append((case, run_case(fns, batch, head_sizes, dtype)))
    report = format_report(results, peak)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(report)


# ---- pytest-benchmark mode ------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")


@needs_cuda
@pytest.mark.parametrize("variant", ["triton", "cuda", "eager", "compile", "liger"])
@pytest.mark.parametrize("case", MAIN_CASES + sweep_cases(), ids=lambda c: c[0])
def test_kd_loss_fwd_bwd(benchmark, case, variant):
    fns = variants()
    if variant not in fns:
        pytest.skip(f"{variant} unavailable (liger_kernel not installed, or rcfast built without CUDA)")
    _, batch, head_sizes, dtype = case
    student, teacher = make_inputs(batch, head_sizes, dtype)
    check_agreement({variant: fns[variant]}, student, teacher, head_sizes)
    fn = fns[variant]

    def step():
        student.grad = None
        fn(student, teacher, head_sizes).backward()
        torch.cuda.synchronize()

    for _ in range(3):  # compile / autotune outside the timed rounds
        step()
    benchmark.pedantic(step, rounds=50, iterations=1)
    seconds = statistics.median(benchmark.stats.stats.data)
    gbs = bytes_moved(batch, head_sizes, dtype, "fwd+bwd") / seconds / 1e9
    benchmark.extra_info["GB/s (bytes model)"] = round(gbs, 1)


if __name__ == "__main__":
    main()
