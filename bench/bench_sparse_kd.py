"""Benchmark: the top-k (sparse teacher) KD loss on the CPU, forward + backward.

What a teacher cache buys in the loss itself: the sparse kernel reads the
student and k teacher entries per (row, head) and writes the gradient, where
the dense kernel also reads a dense teacher as large as the student.

Contenders, all with ``torch.set_num_threads(2)`` in one process, on the same
student logits:

- ``sparse_cpu``: ``rcfast.sparse_multihead_kd_loss(..., backend="cpu")`` with the
  teacher's top-k per head (k = 8 and 32);
- ``dense_cpu``: ``rcfast.multihead_kd_loss(..., backend="cpu")`` against the
  dense teacher (the op the sparse one replaces when a cache stores top-k);
- ``sparse_eager``: what one writes in PyTorch for a top-k teacher, per head
  ``log_softmax(s / tau)`` gathered at the indices, ``softmax(values / tau)``,
  ``sum p (log p - log q) * tau**2 / B``;
- ``sparse_compile``: ``torch.compile`` of exactly that function.

Cases (tau = 4), as bench/bench_kd_loss.py: ``a_fp32``/``a_bf16``: B = 1024,
heads [1000, 196, 100, 397]; ``b_bf16``: 4096 rows x 2 heads x 32 000 classes.

Measured per (case, k) and contender: wall time of ``student.grad = None;
loss = fn(...); loss.backward()`` (median over interleaved rounds; fastest step
too), process CPU time per step, and the peak memory the step allocates beyond
the gradient it returns (torch.profiler allocator events), with the machine's
copy bandwidth in the same run (the helpers of bench/bench_kd_loss.py). Bytes
moved by the fused kernels: sparse = read student + write gradient + the k
entries (values and indices); dense = read student + read teacher + write
gradient; the memory bound is those bytes at the copy bandwidth.

    python bench/bench_sparse_kd.py [--quick] [--rounds 9] [--skip-b] [--out bench/results/sparse_kd_cpu.md]
    python bench/bench_sparse_kd.py --gpu [--quick] [--out FILE]   # CUDA tensors: bench/bench_sparse_kd_gpu.py

writes the markdown report and ends with the line
``sparse top-k loss: <X>x the dense loss (a_bf16, k=32)``;
``pytest bench/bench_sparse_kd.py --benchmark-only`` times the same steps with
pytest-benchmark.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
for path in (REPO_ROOT, BENCH_DIR):  # `python bench/bench_sparse_kd.py` from a checkout
    if path not in sys.path:
        sys.path.insert(0, path)

import rcfast  # noqa: E402
from bench_kd_loss import (  # noqa: E402  (the dense benchmark's machine limits, memory probe, report helpers)
    CASES, NUM_THREADS, TEMPERATURE, Case, Result, _fmt_bytes, _load, make_step, measure_copy_bandwidth,
    peak_extra_bytes, ratio,
)

TOP_KS = (8, 32)
CONTENDERS = ("sparse_cpu", "dense_cpu", "sparse_eager", "sparse_compile")
HEADLINE = ("a_bf16", 32)


@dataclass(frozen=True)
class SparseInputs:
    student: torch.Tensor
    teacher: torch.Tensor  # dense, for dense_cpu
    values: torch.Tensor   # [B, H, k] top-k of the teacher per head
    indices: torch.Tensor  # [B, H, k] int32

    @property
    def entry_bytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.indices.numel() * self.indices.element_size()


def make_inputs(case: Case, k: int, seed: int = 0, device: str = "cpu") -> SparseInputs:
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (case.batch, case.num_classes)
    student = (torch.randn(shape, generator=g, device=device) * 3.0).to(case.dtype)
    teacher = (torch.randn(shape, generator=g, device=device) * 3.0).to(case.dtype)
    tops = [head.topk(k, dim=1) for head in teacher.split(list(case.head_sizes), dim=1)]
    values = torch.stack([v for v, _ in tops], dim=1).contiguous()
    indices = torch.stack([i for _, i in tops], dim=1).to(torch.int32).contiguous()
    return SparseInputs(student.requires_grad_(True), teacher, values, indices)


def eager_sparse_kd_loss(student, values, indices, head_sizes, tau=TEMPERATURE):
    """The plain PyTorch top-k KD loss the fused sparse kernel replaces."""
    loss = 0.0
    for h, s in enumerate(student.split(head_sizes, dim=1)):
        log_q = torch.log_softmax(s.float() / tau, dim=1).gather(1, indices[:, h].long())
        log_p = torch.log_softmax(values[:, h].float() / tau, dim=1)
        loss = loss + (log_p.exp() * (log_p - log_q)).sum() / s.shape[0] * tau**2
    return loss


_COMPILED: dict[str, object] = {}


def loss_fn(contender: str, case: Case, inputs: SparseInputs):
    splits = list(case.head_sizes)
    if contender == "sparse_cpu":
        return lambda s: rcfast.sparse_multihead_kd_loss(s, inputs.values, inputs.indices, splits=splits,
                                                         temperature=TEMPERATURE, backend="cpu")
    if contender == "dense_cpu":
        return lambda s: rcfast.multihead_kd_loss(s, inputs.teacher, splits=splits, temperature=TEMPERATURE,
                                                  backend="cpu")
    if contender == "sparse_eager":
        return lambda s: eager_sparse_kd_loss(s, inputs.values, inputs.indices, splits)
    if contender == "sparse_compile":
        key = f"{case.name}-{inputs.values.shape[2]}"
        if key not in _COMPILED:  # one static-shape compilation per (case, k)
            _COMPILED[key] = torch.compile(eager_sparse_kd_loss, dynamic=False)
        compiled = _COMPILED[key]
        return lambda s: compiled(s, inputs.values, inputs.indices, splits)
    raise ValueError(contender)


def run_case(case: Case, k: int, rounds: int, steps_per_round: int) -> tuple[SparseInputs, dict[str, Result]]:
    inputs = make_inputs(case, k)
    results = {c: Result(c) for c in CONTENDERS}
    steps = {}
    for contender in CONTENDERS:
        step = make_step(lambda s, _t, fn=loss_fn(contender, case, inputs): fn(s), inputs.student, None)
        t0 = time.perf_counter()
        results[contender].loss = float(step().detach())  # warm-up (and compilation)
        results[contender].first_call_s = time.perf_counter() - t0
        step()
        steps[contender] = step
    for round_index in range(rounds):
        # Interleaved, in a rotating order, so slow phases of the shared machine hit everyone.
        shift = round_index % len(CONTENDERS)
        for contender in CONTENDERS[shift:] + CONTENDERS[:shift]:
            times = []
            for _ in range(steps_per_round):
                c0, t0 = time.process_time(), time.perf_counter()
                steps[contender]()
                t1, c1 = time.perf_counter(), time.process_time()
                times.append((t1 - t0) * 1e3)
                results[contender].cpu_ms.append((c1 - c0) * 1e3)
            results[contender].step_ms += times
            results[contender].round_ms.append(statistics.median(times))
    for contender in CONTENDERS:
        # The previous step's gradient is freed first, so that the probe sees this
        # step allocate its own (the inputs are shared by every contender).
        inputs.student.grad = None
        results[contender].extra_bytes = peak_extra_bytes(steps[contender], case.logits_bytes)
    inputs.student.grad = None
    return inputs, results


def bytes_moved(case: Case, inputs: SparseInputs, contender: str) -> int:
    if contender == "dense_cpu":
        return 3 * case.logits_bytes
    return 2 * case.logits_bytes + inputs.entry_bytes


def format_report(copy_bw, case_results, rounds, load_before, load_after, command_args="") -> str:
    lines = [
        "# Top-k (sparse teacher) KD loss on the CPU: forward + backward",
        "",
        f"Generated by `python bench/bench_sparse_kd.py{command_args}` (see its docstring for the method).",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, `torch.set_num_threads({NUM_THREADS})`, "
        f"CPU kernel path `{torch.ops.rcfast.kd_cpu_capability()}`",
        f"- load average before / after the run: {load_before} / {load_after} (other work shares this machine: "
        "absolute times are noisy, the interleaved ratios less so)",
        f"- copy bandwidth (copy_ of 256 MiB, read + write, best at the start and the end): "
        f"**{copy_bw / 1e9:.1f} GB/s**",
        f"- timing: {rounds}; wall = median over rounds of each round's median step (fastest step in brackets); "
        "ratios = median over rounds of the per-round ratio; cpu = median process CPU time per step",
        "",
        "| case | k | contender | wall ms | cpu ms | dense_cpu / this | eager / this | compile / this | "
        "extra memory | loss | first call s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    bounds = []
    for case, k, inputs, results in case_results:
        for contender in CONTENDERS:
            r = results[contender]
            lines.append(
                f"| {case.name} | {k} | {contender} | {r.median_ms:.2f} ({r.min_ms:.2f}) | {r.cpu_median_ms:.2f} | "
                f"{ratio(results, 'dense_cpu', contender):.2f}x | {ratio(results, 'sparse_eager', contender):.2f}x | "
                f"{ratio(results, 'sparse_compile', contender):.2f}x | {_fmt_bytes(r.extra_bytes)} | "
                f"{r.loss:.6g} | {r.first_call_s:.2f} |")
        for contender in ("sparse_cpu", "dense_cpu"):
            moved = bytes_moved(case, inputs, contender)
            bound_ms = moved / copy_bw * 1e3
            r = results[contender]
            bounds.append(
                f"| {case.name} | {k} | {contender} | {_fmt_bytes(moved)} | {bound_ms:.2f} | "
                f"{r.median_ms:.2f} ({r.min_ms:.2f}) | {100 * bound_ms / r.median_ms:.0f}% "
                f"(best step {100 * bound_ms / r.min_ms:.0f}%) |")
    lines += [
        "",
        "Bytes the fused kernels must move (sparse: read student + write gradient + the k entries; dense: also "
        "read the dense teacher) and the memory bound at the copy bandwidth:",
        "",
        "| case | k | kernel | bytes moved | memory bound ms | wall ms (best) | fraction of the bound achieved |",
        "|---|---|---|---|---|---|---|",
        *bounds,
        "",
        "`extra memory` is the peak of bytes the step allocates minus the gradient it returns (for the fused "
        "kernels: exp cache, per-thread entry scratch, [B, H] losses; for eager/compile: the log-softmax "
        "intermediates). The dense contender's extra memory excludes its dense teacher, which the sparse ones "
        "never need (a cache of top-k entries is what they read).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="rounds for the (a) cases; (b) runs a third of them")
    parser.add_argument("--steps", type=int, default=5, help="steps per contender per round for (a); (b) runs 1")
    parser.add_argument("--skip-b", action="store_true", help="skip the large (b) case")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 3 rounds x 2 steps, (a) cases only (figures are rough)")
    parser.add_argument("--gpu", action="store_true",
                        help="the GPU benchmark instead (triton and cuda on CUDA tensors, bench/bench_sparse_kd_gpu.py)")
    parser.add_argument("--out", default=None,
                        help="report file (default bench/results/sparse_kd_cpu.md, or sparse_kd_gpu.md with --gpu)")
    args = parser.parse_args(argv)
    command_args = "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    if args.out is None:
        args.out = os.path.join(REPO_ROOT, "bench", "results", "sparse_kd_gpu.md" if args.gpu else "sparse_kd_cpu.md")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.gpu:
        from bench_sparse_kd_gpu import main_gpu
        return main_gpu(args.quick, args.out, f"python bench/bench_sparse_kd.py{command_args}")
    if args.quick:
        args.rounds, args.steps, args.skip_b = 3, 2, True

    torch.set_num_threads(NUM_THREADS)
    if "cpu" not in rcfast.available_backends():
        raise SystemExit("rcfast._C is not built: bash scripts/setup_env.sh")
    load_before = _load()
    copy_bw = measure_copy_bandwidth()
    print(f"copy {copy_bw / 1e9:.1f} GB/s", flush=True)
    case_results = []
    for name, case in CASES.items():
        if args.skip_b and name.startswith("b"):
            continue
        large = case.logits_bytes >= (64 << 20)
        rounds = max(2, args.rounds // 3) if large else args.rounds
        steps = 1 if large else args.steps
        for k in TOP_KS:
            print(f"{case.description}, k={k}: {rounds} rounds x {steps} steps", flush=True)
            inputs, results = run_case(case, k, rounds, steps)
            for r in results.values():
                print(f"  {r.contender:14s} {r.median_ms:9.2f} ms (cpu {r.cpu_median_ms:9.2f})  "
                      f"extra {_fmt_bytes(r.extra_bytes)}  loss {r.loss:.6g}", flush=True)
            case_results.append((case, k, inputs, results))
            gc.collect()
    copy_bw = max(copy_bw, measure_copy_bandwidth())  # the machine's limit is its best
    timing = f"{args.rounds} rounds x {args.steps} steps (a)"
    if not args.skip_b:
        timing += f", {max(2, args.rounds // 3)} x 1 (b)"
    report = format_report(copy_bw, case_results, timing, load_before, _load(), command_args)
    with open(args.out, "w") as f:
        f.write(report)
    print(report)
    for case, k, _, results in case_results:
        if (case.name, k) == HEADLINE:
            print(f"sparse top-k loss: {ratio(results, 'dense_cpu', 'sparse_cpu'):.2f}x the dense loss "
                  f"({case.name}, k={k})")
    return 0


# --------------------------------------------------------------------------- pytest-benchmark

try:
    import pytest
except ImportError:  # script mode without pytest installed
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module", autouse=True)
    def _two_threads():
        previous = torch.get_num_threads()
        torch.set_num_threads(NUM_THREADS)
        yield
        torch.set_num_threads(previous)

    @pytest.mark.parametrize("contender", CONTENDERS)
    @pytest.mark.parametrize("k", TOP_KS)
    @pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("b")])
    def test_sparse_kd_loss_fwd_bwd(benchmark, case, k, contender):
        if contender in ("sparse_cpu", "dense_cpu") and "cpu" not in rcfast.available_backends():
            pytest.skip("rcfast._C is not built")
        spec = CASES[case]
        inputs = make_inputs(spec, k)
        fn = loss_fn(contender, spec, inputs)
        step = make_step(lambda s, _t: fn(s), inputs.student, None)
        step()  # compile / warm up outside the timing
        benchmark.group = f"{case}-k{k}"
        benchmark.pedantic(step, rounds=30, iterations=1, warmup_rounds=2)


if __name__ == "__main__":
    sys.exit(main())
