"""Benchmark: the fused multi-head KD loss on the CPU, forward + backward.

Contenders, all with ``torch.set_num_threads(2)`` in one process:

- ``rcfast_cpu``: ``rcfast.multihead_kd_loss(..., backend="cpu")`` (rcfast._C);
- ``eager``: what one writes in PyTorch, per head
  ``F.kl_div(F.log_softmax(s/tau), F.log_softmax(t/tau), log_target=True,
  reduction="batchmean") * tau**2``, summed over heads;
- ``compile``: ``torch.compile`` of exactly that eager function.

Cases (tau = 4):

- ``a_fp32`` / ``a_bf16``: B = 1024, heads [1000, 196, 100, 397] (ImageNet,
  and three downstream tasks), float32 / bfloat16;
- ``b_bf16``: 4096 rows x 2 heads x 32 000 classes in bfloat16.

Measured per case and contender: wall time of ``student.grad = None;
loss = fn(student, teacher); loss.backward()`` (median over interleaved rounds,
because other work on a shared machine moves single runs; the minimum too),
CPU time per step (user + sys of the process: far less sensitive to other
load), and the peak memory the step allocates beyond the gradient it returns
(torch.profiler's allocator events: the running sum of allocated bytes,
peak minus the gradient's bytes). Machine limits, in the same run: copy
bandwidth (``Tensor.copy_`` of a 256 MiB buffer, 2 threads; read + write bytes
per second) and exp throughput (``torch.exp`` on a 1 MiB, L2-resident buffer,
2 threads). The memory bound of a case is 3 logits-sized transfers (read
student, read teacher, write gradient) at that bandwidth; the exp bound is 2
exps per logit (the kernel's count: student and teacher, none recomputed for
the gradient when the exp cache is used) at torch's exp rate.

Two entry points:

    python bench/bench_kd_loss.py [--rounds 5] [--skip-b] [--out bench/results/kd_loss_cpu.md]

runs everything and writes the markdown report;

    pytest bench/bench_kd_loss.py --benchmark-only [--benchmark-group-by=param:case]

times the same steps with pytest-benchmark (no report file).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `python bench/bench_kd_loss.py` from a checkout
    sys.path.insert(0, REPO_ROOT)

import rcfast  # noqa: E402

NUM_THREADS = 2
TEMPERATURE = 4.0
CONTENDERS = ("rcfast_cpu", "eager", "compile")


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    head_sizes: tuple[int, ...]
    dtype: torch.dtype
    description: str

    @property
    def num_classes(self) -> int:
        return sum(self.head_sizes)

    @property
    def logits_bytes(self) -> int:
        return self.batch * self.num_classes * torch.empty((), dtype=self.dtype).element_size()


CASES = {
    "a_fp32": Case("a_fp32", 1024, (1000, 196, 100, 397), torch.float32, "(a) B=1024, heads [1000, 196, 100, 397], float32"),
    "a_bf16": Case("a_bf16", 1024, (1000, 196, 100, 397), torch.bfloat16, "(a) B=1024, heads [1000, 196, 100, 397], bfloat16"),
    "b_bf16": Case("b_bf16", 4096, (32000, 32000), torch.bfloat16, "(b) 4096 rows x 2 heads x 32 000 classes, bfloat16"),
}


def make_inputs(case: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Realistic logits: a few units wide, as trained classifiers produce.
    student = (torch.randn(case.batch, case.num_classes, generator=g) * 3.0).to(case.dtype)
    teacher = (torch.randn(case.batch, case.num_classes, generator=g) * 3.0).to(case.dtype)
    return student.requires_grad_(True), teacher


def eager_kd_loss(student, teacher, head_sizes, tau=TEMPERATURE):
    """The plain PyTorch multi-head KD loss the fused kernel replaces."""
    loss = 0.0
    for s, t in zip(student.split(head_sizes, dim=1), teacher.split(head_sizes, dim=1)):
        loss = loss + F.kl_div(
            F.log_softmax(s / tau, dim=1), F.log_softmax(t / tau, dim=1),
            log_target=True, reduction="batchmean",
        ) * tau**2
    return loss


_COMPILED: dict[str, object] = {}


def compiled_kd_loss(case: Case):
    """torch.compile of eager_kd_loss, one static-shape compilation per case."""
    if case.name not in _COMPILED:
        _COMPILED[case.name] = torch.compile(eager_kd_loss, dynamic=False)
    return _COMPILED[case.name]


def loss_fn(contender: str, case: Case):
    splits = list(case.head_sizes)
    if contender == "rcfast_cpu":
        return lambda s, t: rcfast.multihead_kd_loss(s, t, splits=splits, temperature=TEMPERATURE, backend="cpu")
    if contender == "eager":
        return lambda s, t: eager_kd_loss(s, t, splits)
    if contender == "compile":
        compiled = compiled_kd_loss(case)
        return lambda s, t: compiled(s, t, splits)
    raise ValueError(contender)


def make_step(fn, student, teacher):
    def step():
        student.grad = None
        loss = fn(student, teacher)
        loss.backward()
        return loss
    return step


# --------------------------------------------------------------------------- machine limits

def _best_time(fn, repeats: int) -> float:
    """The machine's limit is what it can do at best: the fastest of the repeats."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_copy_bandwidth(nbytes: int = 256 << 20) -> float:
    """Bytes read + written per second by ``Tensor.copy_`` of a buffer far larger than the caches."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    seconds = _best_time(lambda: dst.copy_(src), 40)
    return 2 * nbytes / seconds


def measure_exp_rate(numel: int = 1 << 18) -> float:
    """Exps per second of ``torch.exp`` on an L2-resident float32 buffer (compute, not memory)."""
    src = torch.randn(numel)
    dst = torch.empty_like(src)
    inner = 50

    def run():
        for _ in range(inner):
            torch.exp(src, out=dst)

    return numel * inner / _best_time(run, 20)


# --------------------------------------------------------------------------- memory

def peak_extra_bytes(step, grad_bytes: int) -> int:
    """Peak bytes live during ``step`` (allocator events), minus the gradient it leaves behind."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    deltas = sorted(
        (e["ts"], e["args"]["Bytes"]) for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0
    )
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak - grad_bytes


# --------------------------------------------------------------------------- one case

@dataclass
class Result:
    contender: str
    round_ms: list[float] = field(default_factory=list)   # median step of each round
    step_ms: list[float] = field(default_factory=list)    # every step
    cpu_ms: list[float] = field(default_factory=list)
    extra_bytes: int = 0
    first_call_s: float = 0.0
    loss: float = float("nan")

    @property
    def median_ms(self) -> float:
        return statistics.median(self.round_ms)

    @property
    def min_ms(self) -> float:
        return min(self.step_ms)

    @property
    def cpu_median_ms(self) -> float:
        return statistics.median(self.cpu_ms)


def ratio(results: dict[str, Result], slower: str, faster: str) -> float:
    """Median over rounds of the per-round time ratio: each round runs every
    contender back to back, so a slow phase of the shared machine cancels."""
    return statistics.median(a / b for a, b in zip(results[slower].round_ms, results[faster].round_ms))


def run_case(case: Case, rounds: int, steps_per_round: int) -> dict[str, Result]:
    student, teacher = make_inputs(case)
    results = {c: Result(c) for c in CONTENDERS}
    steps = {}
    for contender in CONTENDERS:
        step = make_step(loss_fn(contender, case), student, teacher)
        t0 = time.perf_counter()
        results[contender].loss = float(step().detach())  # warm-up (and compilation)
        results[contender].first_call_s = time.perf_counter() - t0
        step()
        steps[contender] = step
    for round_index in range(rounds):
        # Interleaved, in a rotating order, so slow phases of the machine hit everyone.
        order = CONTENDERS[round_index % len(CONTENDERS):] + CONTENDERS[:round_index % len(CONTENDERS)]
        for contender in order:
            times = []
            for _ in range(steps_per_round):
                c0, t0 = time.process_time(), time.perf_counter()
                steps[contender]()
                t1, c1 = time.perf_counter(), time.process_time()
                times.append((t1 - t0) * 1e3)
                results[contender].cpu_ms.append((c1 - c0) * 1e3)
            results[contender].step_ms += times
            results[contender].round_ms.append(statistics.median(times))
    grad_bytes = case.logits_bytes
    for contender in CONTENDERS:
        results[contender].extra_bytes = peak_extra_bytes(steps[contender], grad_bytes)
    student.grad = None
    return results


# --------------------------------------------------------------------------- report

def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_report(limits, case_results, rounds, steps_per_round, load_before, load_after) -> str:
    copy_bw, exp_rate = limits
    lines = [
        "# Fused multi-head KD loss on the CPU: forward + backward",
        "",
        "Generated by `python bench/bench_kd_loss.py` (see its docstring for the method).",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, `torch.set_num_threads({NUM_THREADS})`, "
        f"CPU kernel path `{torch.ops.rcfast.kd_cpu_capability()}`",
        f"- load average before / after the run: {load_before} / {load_after} (other work shares this machine)",
        f"- copy bandwidth (copy_ of 256 MiB, read + write, best of 40 at the start and the end): "
        f"**{copy_bw / 1e9:.1f} GB/s**; exp throughput (torch.exp, L2-resident): **{exp_rate / 1e9:.2f} G exp/s**",
        f"- timing: {rounds} rounds, each running every contender for {steps_per_round} steps back to back "
        "(rotating order); wall = median over rounds of each round's median step (fastest step in brackets); "
        "ratios = median over rounds of the per-round ratio; cpu = median process CPU time per step "
        "(both threads; includes OpenMP spin-waiting)",
        "",
        "| case | contender | wall ms | cpu ms | eager / this | compile / this | extra memory | extra / grad | loss | first call s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    bounds = []
    for case, results in case_results:
        for contender in CONTENDERS:
            r = results[contender]
            lines.append(
                f"| {case.name} | {contender} | {r.median_ms:.2f} ({r.min_ms:.2f}) | {r.cpu_median_ms:.2f} | "
                f"{ratio(results, 'eager', contender):.2f}x | {ratio(results, 'compile', contender):.2f}x | "
                f"{_fmt_bytes(r.extra_bytes)} | "
                f"{100 * r.extra_bytes / case.logits_bytes:.2f}% | {r.loss:.6g} | {r.first_call_s:.2f} |"
            )
        mem_bound_ms = 3 * case.logits_bytes / copy_bw * 1e3
        exp_bound_ms = 2 * case.batch * case.num_classes / exp_rate * 1e3
        ours = results["rcfast_cpu"]
        bounds.append(
            f"| {case.name} | {_fmt_bytes(case.logits_bytes)} | {mem_bound_ms:.2f} | {exp_bound_ms:.2f} | "
            f"{ours.median_ms:.2f} ({ours.min_ms:.2f}) | {ours.median_ms / mem_bound_ms:.2f}x "
            f"({100 * mem_bound_ms / ours.median_ms:.0f}%; best step {100 * mem_bound_ms / ours.min_ms:.0f}%) | "
            f"{100 * exp_bound_ms / ours.median_ms:.0f}% |"
        )
    lines += [
        "",
        "Bounds for the fused kernel (memory: 3 logits-sized transfers at the copy bandwidth; "
        "exp: 2 exps per logit at torch.exp's rate — the kernel's own exp is faster than torch's, "
        "so this one can be exceeded):",
        "",
        "| case | logits size | memory bound ms | exp bound ms | rcfast_cpu ms (best) | rcfast / memory bound (fraction of the bound achieved) | fraction of exp bound |",
        "|---|---|---|---|---|---|---|",
        *bounds,
        "",
        "First calls (`first call s`: torch.compile's compilation, rcfast's one-time load) are excluded from the timings. `extra memory` is the "
        "peak of bytes the step allocates (torch.profiler allocator events) minus the gradient it returns; "
        "for rcfast_cpu it is the per-thread exp cache (at most 5% of the gradient by construction), "
        "the [B, H] per-task losses and a few scalars.",
        "",
    ]
    return "\n".join(lines)


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="rounds for the (a) cases; (b) runs a fifth of them")
    parser.add_argument("--steps", type=int, default=5, help="steps per contender per round for (a); (b) runs 1")
    parser.add_argument("--skip-b", action="store_true", help="skip the large (b) case")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results", "kd_loss_cpu.md"))
    args = parser.parse_args(argv)

    torch.set_num_threads(NUM_THREADS)
    if "cpu" not in rcfast.available_backends():
        raise SystemExit("rcfast._C is not built: pip install --no-build-isolation -e .")
    load_before = _load()
    limits = (measure_copy_bandwidth(), measure_exp_rate())
    print(f"copy {limits[0] / 1e9:.1f} GB/s, exp {limits[1] / 1e9:.2f} G/s", flush=True)
    case_results = []
    for name, case in CASES.items():
        if args.skip_b and name.startswith("b"):
            continue
        large = case.logits_bytes >= (64 << 20)
        steps = 1 if large else args.steps
        rounds = max(3, args.rounds // 5) if large else args.rounds
        print(f"{case.description}: {rounds} rounds x {steps} steps", flush=True)
        results = run_case(case, rounds, steps)
        for r in results.values():
            print(f"  {r.contender:11s} {r.median_ms:9.2f} ms (cpu {r.cpu_median_ms:9.2f})  "
                  f"extra {_fmt_bytes(r.extra_bytes)}  loss {r.loss:.6g}", flush=True)
        case_results.append((case, results))
        gc.collect()
    # The machine's limits are its best: measured again at the end (other work on a
    # shared machine may have slowed the first measurement), keeping the best of both.
    end_limits = (measure_copy_bandwidth(), measure_exp_rate())
    limits = (max(limits[0], end_limits[0]), max(limits[1], end_limits[1]))
    print(f"limits (best of start and end): copy {limits[0] / 1e9:.1f} GB/s, exp {limits[1] / 1e9:.2f} G/s")
    report = format_report(limits, case_results, f"{args.rounds} (a) / {max(3, args.rounds // 5)} (b)",
                           f"{args.steps} (a) / 1 (b)", load_before, _load())
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(report)
    print(report)
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
    @pytest.mark.parametrize("case", list(CASES))
    def test_kd_loss_fwd_bwd(benchmark, case, contender):
        if contender == "rcfast_cpu" and "cpu" not in rcfast.available_backends():
            pytest.skip("rcfast._C is not built")
        spec = CASES[case]
        student, teacher = make_inputs(spec)
        step = make_step(loss_fn(contender, spec), student, teacher)
        step()  # compile / warm up outside the timing
        large = spec.logits_bytes >= (64 << 20)
        benchmark.group = case
        benchmark.extra_info["logits_bytes"] = spec.logits_bytes
        benchmark.pedantic(step, rounds=3 if large else 30, iterations=1, warmup_rounds=0 if large else 2)


if __name__ == "__main__":
    sys.exit(main())
