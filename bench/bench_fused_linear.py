"""Benchmark: the fused linear + multi-head KD loss, forward + backward, time and memory.

The step is ``loss(hidden @ weight.T, teacher_logits).backward()`` with
``hidden [B, D]`` and ``weight [N, D]`` requiring gradients (an LM head or the
packed heads of ``MultiHeadStudent``), tau = 4. Contenders, each case and
contender in its own subprocess (so memory figures do not mix), two threads:

- ``fused``: ``rcfast.fused_linear_multihead_kd_loss(hidden, weight, teacher, ...)``
  (``backend="cpu"``; the logits never exist);
- ``materialised``: ``rcfast.multihead_kd_loss(F.linear(hidden, weight), teacher, ...)``
  (torch's GEMM, then rcfast's dense fused loss);
- ``eager``: ``F.linear`` then per head ``F.kl_div(F.log_softmax(s / tau),
  F.log_softmax(t / tau), log_target=True) * tau**2`` (bench/bench_kd_loss.py's);
- ``compile``: ``torch.compile`` of that eager function, linear included.

Cases (the issue's): B = 4096, D in {1024, 2048}, heads 2 x 32 000 and 1 x 128 000,
float32 and bfloat16. ``--quick``: B = 4096, D = 128, heads 2 x 8 000 and 1 x 32 000
(a 16x smaller GEMM).

Measured per (case, contender): wall and CPU time of the steps after a warm-up
(which compiles, for ``compile``); **peak memory beyond the inputs**: the peak of
live tensor bytes during one step (torch.profiler allocator events, which count
torch.compile's buffers too), and the process's RSS high-water mark above its RSS
once the inputs exist (``ru_maxrss``; includes the allocator's and the
compiler's own overheads). The targets (issue 14) are checked in the report:
fused peak <= dh + dW + 15 % of the logits' bytes, fused time <= 1.1 x the
materialised path, ``compile`` >= 2 x the fused time.

Guards for a shared machine: a contender whose estimated peak does not fit in
``MemAvailable`` is skipped, and so is a non-fused contender whose step is
estimated (from this machine's GEMM rates for torch's three GEMM layouts, timed
in the parent) to take longer than ``--max-step-s``; the report says which and why.

GPU (``--gpu``, i.e. ``--device cuda``; not runnable on a CPU-only machine): the
same steps with ``backend="auto"`` (Triton), synchronised timing,
``torch.cuda.max_memory_allocated`` beyond the inputs, plus, with the teacher as
its last linear layer (no teacher logits at all), the fused op
(``fused_teacher_linear``) and Liger-Kernel's fused linear JSD with beta = 0
(forward KL(p_t || p_s), one temperature, no tau**2) when ``liger_kernel`` is
installed. The contenders of a case share one process there (the peak is reset
between them; RSS is not reported). On a GPU the issue's shapes take
milliseconds, so ``--gpu --quick`` runs two of them (D = 1024, bfloat16, both
head layouts; about 1-2 minutes, mostly torch.compile) instead of the CPU's
smaller shapes.

    python bench/bench_fused_linear.py [--quick] [--gpu] [--steps 2] [--cases NAME ...] [--out FILE]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
for path in (REPO_ROOT, BENCH_DIR):
    if path not in sys.path:
        sys.path.insert(0, path)

import rcfast  # noqa: E402
from bench_kd_loss import _fmt_bytes, _load, eager_kd_loss, peak_extra_bytes  # noqa: E402

NUM_THREADS = 2
TEMPERATURE = 4.0
CONTENDERS = ("fused", "materialised", "eager", "compile")
# On a GPU also the teacher as its last linear layer (no teacher logits at all), for a
# like-for-like comparison with Liger's fused linear JSD, which takes it that way.
TEACHER_LINEAR_CONTENDERS = ("fused_teacher_linear", "liger_jsd")
GPU_CONTENDERS = CONTENDERS + TEACHER_LINEAR_CONTENDERS
MEMORY_TARGET_FRACTION = 0.15


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    dim: int
    head_sizes: tuple[int, ...]
    dtype_name: str

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype_name)

    @property
    def num_classes(self) -> int:
        return sum(self.head_sizes)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def logits_bytes(self) -> int:
        return self.batch * self.num_classes * self.itemsize

    @property
    def grad_bytes(self) -> int:
        """The gradients the step must produce: dh and dW."""
        return (self.batch + self.num_classes) * self.dim * self.itemsize

    @property
    def input_bytes(self) -> int:
        return self.grad_bytes + self.logits_bytes  # hidden, weight, teacher logits

    @property
    def gemm_flops(self) -> float:
        return 2.0 * self.batch * self.num_classes * self.dim  # one of the step's three GEMMs


def _cases(batch, dims, heads_list) -> dict[str, Case]:
    cases = {}
    for dtype_name in ("float32", "bfloat16"):
        for dim in dims:
            for heads in heads_list:
                label = f"{len(heads)}x{heads[0] // 1000}k"
                name = f"B{batch}_D{dim}_{label}_{'fp32' if dtype_name == 'float32' else 'bf16'}"
                cases[name] = Case(name, batch, dim, heads, dtype_name)
    return cases


FULL_CASES = _cases(4096, (1024, 2048), ((32000, 32000), (128000,)))
QUICK_CASES = _cases(4096, (128,), ((8000, 8000), (32000,)))
GPU_QUICK_CASES = {name: case for name, case in FULL_CASES.items() if case.dim == 1024 and case.dtype_name == "bfloat16"}
ALL_CASES = {**FULL_CASES, **QUICK_CASES}


# --------------------------------------------------------------------------- the steps

def make_inputs(case: Case, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(case.batch, case.dim, generator=g)
    # Logits a few units wide, as trained classifiers produce.
    weight = torch.randn(case.num_classes, case.dim, generator=g) * (3.0 / case.dim ** 0.5)
    teacher_hidden = torch.randn(case.batch, case.dim, generator=g)
    teacher_weight = torch.randn(case.num_classes, case.dim, generator=g) * (3.0 / case.dim ** 0.5)
    cast = dict(device=device, dtype=case.dtype)
    return (hidden.to(**cast).requires_grad_(True), weight.to(**cast).requires_grad_(True),
            teacher_hidden.to(**cast), teacher_weight.to(**cast))


def eager_linear_kd(hidden, weight, teacher, head_sizes):
    return eager_kd_loss(F.linear(hidden, weight), teacher, head_sizes)


def loss_fn(contender: str, case: Case, device: str):
    """``fn(hidden, weight, teacher_logits, teacher_hidden, teacher_weight) -> loss``."""
    splits = list(case.head_sizes)
    backend = "cpu" if device == "cpu" else "auto"
    if contender == "fused":
        return lambda h, w, t, th, tw: rcfast.fused_linear_multihead_kd_loss(
            h, w, t, splits=splits, temperature=TEMPERATURE, backend=backend)
    if contender == "fused_teacher_linear":
        return lambda h, w, t, th, tw: rcfast.fused_linear_multihead_kd_loss(
            h, w, (th, tw), splits=splits, temperature=TEMPERATURE, backend=backend)
    if contender == "materialised":
        return lambda h, w, t, th, tw: rcfast.multihead_kd_loss(
            F.linear(h, w), t, splits=splits, temperature=TEMPERATURE, backend=backend)
    if contender == "eager":
        return lambda h, w, t, th, tw: eager_linear_kd(h, w, t, splits)
    if contender == "compile":
        compiled = torch.compile(eager_linear_kd, dynamic=False)
        return lambda h, w, t, th, tw: compiled(h, w, t, splits)
    if contender == "liger_jsd":  # GPU only; one head (Liger has no per-head temperatures)
        from liger_kernel.ops.fused_linear_jsd import LigerFusedLinearJSDFunction

        return lambda h, w, t, th, tw: LigerFusedLinearJSDFunction.apply(
            h, w, th, tw, None, 0.0, -100, TEMPERATURE)
    raise ValueError(contender)


# --------------------------------------------------------------------------- the worker

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_worker(case: Case, contender: str, steps: int, device: str) -> dict:
    """One contender on one case, in this (fresh) process."""
    torch.set_num_threads(NUM_THREADS)
    hidden, weight, teacher_hidden, teacher_weight = make_inputs(case, device)
    if contender in TEACHER_LINEAR_CONTENDERS:
        teacher = None
    else:  # the teacher's logits are the input; its linear layer is not
        with torch.no_grad():
            teacher = F.linear(teacher_hidden, teacher_weight)
        teacher_hidden = teacher_weight = None
    rss_inputs = _rss_bytes()
    fn = loss_fn(contender, case, device)

    def step():
        hidden.grad = None
        weight.grad = None
        loss = fn(hidden, weight, teacher, teacher_hidden, teacher_weight)
        loss.backward()
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    loss = float(step().detach())  # warm-up (and compilation)
    sync()
    first_call_s = time.perf_counter() - t0
    wall, cpu = [], []
    for _ in range(steps):
        c0, t0 = time.process_time(), time.perf_counter()
        step()
        sync()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if device == "cuda":
        hidden.grad = weight.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        tensor_peak = torch.cuda.max_memory_allocated() - base
    else:
        hidden.grad = weight.grad = None
        tensor_peak = peak_extra_bytes(step, 0)  # the gradients it leaves are counted: they are the point
    # On a GPU the contenders share a process: the host's high-water mark says nothing there.
    rss_peak = (None if device == "cuda" else
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_inputs)
    return dict(case=case.name, contender=contender, loss=loss, first_call_s=first_call_s, wall_s=wall,
                cpu_s=cpu, tensor_peak_bytes=tensor_peak, rss_peak_bytes=rss_peak)


def run_gpu_worker(case: Case, contenders, steps: int) -> list[dict]:
    """Every contender of one case in this process, one after the other (GPU only: the
    peak is ``max_memory_allocated`` reset per contender); a failure is recorded, not raised."""
    results = []
    for contender in contenders:
        try:
            results.append(run_worker(case, contender, steps, "cuda"))
        except Exception as exc:  # e.g. Liger missing or refusing beta = 0: the others still run
            results.append(dict(case=case.name, contender=contender,
                                skipped=f"failed: {type(exc).__name__}: {str(exc)[:200]}"))
        torch.cuda.empty_cache()
    return results


# --------------------------------------------------------------------------- the parent

# Peak bytes beyond the inputs, in logits' sizes, for the memory guard (generous).
ESTIMATED_PEAK_LOGITS = {"fused": 0.3, "materialised": 3.5, "eager": 8.0, "compile": 5.0,
                         "fused_teacher_linear": 0.3, "liger_jsd": 1.0}


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def gemm_rates(dtype: torch.dtype, dim: int) -> tuple[float, float, float]:
    """FLOP/s of the three GEMM layouts of a linear layer's step (torch's own), at 2 threads:
    ``h @ W.T`` (forward), ``g @ W`` (input gradient), ``g.T @ h`` (weight gradient)."""
    rows, classes = 64, 4096
    h = torch.randn(rows, dim).to(dtype)
    w = torch.randn(classes, dim).to(dtype)
    g = torch.randn(rows, classes).to(dtype)
    rates = []
    for fn in (lambda: h @ w.t(), lambda: g @ w, lambda: g.t() @ h):
        fn()
        t0 = time.perf_counter()
        fn()
        rates.append(2.0 * rows * classes * dim / (time.perf_counter() - t0))
    return tuple(rates)


def estimated_step_s(case: Case, rates) -> float:
    return sum(case.gemm_flops / r for r in rates)


def run_in_subprocess(case: Case, contenders, steps: int, device: str, timeout_s: float) -> list[dict]:
    """``contenders`` (one on a CPU, all of the case on a GPU) in a fresh process: one result each."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", case.name, ",".join(contenders),
           "--steps", str(steps), "--device", device]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [dict(case=case.name, contender=c, skipped=f"timed out after {timeout_s:.0f} s") for c in contenders]
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return [dict(case=case.name, contender=c, skipped=f"failed (rc {proc.returncode}): {' | '.join(tail)}")
                for c in contenders]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def format_report(cases, results, args, load_before, load_after, rates) -> str:
    lines = [
        "# Fused linear + multi-head KD loss: forward + backward" + (" (quick)" if args.quick else ""),
        "",
        f"Generated by `python bench/bench_fused_linear.py{' --quick' if args.quick else ''}` "
        "(see its docstring for the method).",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"`torch.set_num_threads({NUM_THREADS})`, device {args.device}; CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}",
        f"- load average before / after: {load_before} / {load_after} (other work shares this machine)",
        f"- torch GEMM rates here (2 threads; forward / input-grad / weight-grad layouts, GFLOP/s): "
        + "; ".join(f"{name}: " + " / ".join(f"{r / 1e9:.1f}" for r in rs) for name, rs in rates.items()),
        f"- {args.steps} timed step(s) after a warm-up; wall = median step; cpu = median process CPU time per "
        "step (both threads; steadier than wall time when other work shares the cores)",
        "- peak = live tensor bytes at the step's peak beyond the inputs (allocator events; the gradients it "
        "leaves are included); RSS = high-water mark of the process above its RSS with the inputs",
        "",
        "| case | contender | wall s | cpu s | vs fused (wall, cpu) | tensor peak | RSS peak | loss | first call s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    targets = []
    for case in cases:
        by = {r["contender"]: r for r in results if r["case"] == case.name}
        fused = by.get("fused", {})
        fused_wall = _median(fused.get("wall_s", []))
        fused_cpu = _median(fused.get("cpu_s", []))
        for contender in (GPU_CONTENDERS if args.device == "cuda" else CONTENDERS):
            r = by.get(contender)
            if r is None:
                continue
            if "skipped" in r:
                lines.append(f"| {case.name} | {contender} | skipped: {r['skipped']} | | | | | | |")
                continue
            wall, cpu = _median(r["wall_s"]), _median(r["cpu_s"])
            rss = "n/a" if r["rss_peak_bytes"] is None else _fmt_bytes(r["rss_peak_bytes"])
            lines.append(
                f"| {case.name} | {contender} | {wall:.2f} | {cpu:.2f} | "
                f"{wall / fused_wall:.2f}x, {cpu / fused_cpu:.2f}x | {_fmt_bytes(r['tensor_peak_bytes'])} | "
                f"{rss} | {r['loss']:.6g} | {r['first_call_s']:.1f} |")
        if "wall_s" not in fused:
            continue
        budget = case.grad_bytes + MEMORY_TARGET_FRACTION * case.logits_bytes
        peak = fused["tensor_peak_bytes"]
        row = [f"| {case.name} | {_fmt_bytes(case.logits_bytes)} | {_fmt_bytes(peak)} "
               f"({_fmt_bytes(peak - case.grad_bytes)} beyond dh + dW = "
               f"{100 * (peak - case.grad_bytes) / case.logits_bytes:.1f}% of the logits) | "
               f"{'yes' if peak <= budget else 'NO'} |"]
        for other, goal in (("materialised", 1.1), ("compile", 2.0)):
            o = by.get(other, {})
            if "wall_s" not in o:
                row.append(f" n/a ({o.get('skipped', 'not run')}) |")
                continue
            cells = []
            for key, ours in (("wall_s", fused_wall), ("cpu_s", fused_cpu)):
                theirs = _median(o[key])
                value = ours / theirs if other == "materialised" else theirs / ours
                ok = value <= goal if other == "materialised" else value >= goal
                cells.append(f"{value:.2f}x ({'yes' if ok else 'NO'})")
            row.append(" " + ", ".join(cells) + " |")
        targets.append("".join(row))
    lines += [
        "",
        "Targets (issue 14): fused peak <= dh + dW + 15 % of the logits; fused time <= 1.1 x materialised; "
        "compile >= 2 x fused time.",
        "",
        "| case | logits | fused peak | memory target met | fused / materialised time (wall, cpu) | "
        "compile / fused time (wall, cpu) |",
        "|---|---|---|---|---|---|",
        *targets,
        "",
    ]
    return "\n".join(lines)


def _write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes (D=128, <=32k classes)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per contender (default 3 quick, 1 full)")
    parser.add_argument("--cases", nargs="*", default=None, help="case names (default: all of the mode)")
    parser.add_argument("--contenders", nargs="*", default=None)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--gpu", action="store_true", help="the same as --device cuda")
    parser.add_argument("--max-step-s", type=float, default=900.0,
                        help="skip a baseline whose step is estimated to take longer (GEMM rates)")
    parser.add_argument("--out", default=None, help="report file (default bench/results/fused_linear_<device>[_quick].md); "
                        "the raw results go next to it as .json")
    parser.add_argument("--report-only", action="store_true", help="re-render the report from the .json of a run")
    parser.add_argument("--resume", action="store_true",
                        help="keep the measured results of the .json (written after every measurement) "
                             "and run only the missing ones")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "CONTENDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gpu:
        args.device = "cuda"
    args.steps = args.steps or (3 if args.quick else 1)

    if args.worker:
        case_name, contenders = args.worker[0], args.worker[1].split(",")
        if args.device == "cuda":
            print(json.dumps(run_gpu_worker(ALL_CASES[case_name], contenders, args.steps)))
        else:
            print(json.dumps([run_worker(ALL_CASES[case_name], c, args.steps, args.device) for c in contenders]))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: the GPU comparison (Triton, Liger) is skipped")
        return 0
    if args.device == "cpu" and "cpu" not in rcfast.available_backends():
        raise SystemExit("rcfast._C is not built: bash scripts/setup_env.sh")

    cases = FULL_CASES
    if args.quick:
        cases = GPU_QUICK_CASES if args.device == "cuda" else QUICK_CASES
    if args.cases:
        cases = {name: ALL_CASES[name] for name in args.cases}
    out = args.out or os.path.join(REPO_ROOT, "bench", "results",
                                   f"fused_linear_{args.device}{'_quick' if args.quick else ''}.md")
    raw_path = os.path.splitext(out)[0] + ".json"
    if args.report_only:
        with open(raw_path) as f:
            raw = json.load(f)
        cases = {name: ALL_CASES[name] for name in raw["cases"]}
        report = format_report(list(cases.values()), raw["results"], args, raw["load_before"],
                               raw["load_after"], raw["rates"])
        _write_atomically(out, report)
        print(report)
        return 0

    contenders = args.contenders or (GPU_CONTENDERS if args.device == "cuda" else CONTENDERS)
    torch.set_num_threads(NUM_THREADS)
    load_before = _load()
    rates = {}
    if args.device == "cpu":
        for case in cases.values():
            key = f"{case.dtype_name} D={case.dim}"
            if key not in rates:
                rates[key] = gemm_rates(case.dtype, case.dim)
    results = []
    if args.resume and os.path.exists(raw_path):
        with open(raw_path) as f:
            results = [r for r in json.load(f)["results"] if "skipped" not in r]
    done = {(r["case"], r["contender"]) for r in results}
    os.makedirs(os.path.dirname(out), exist_ok=True)

    def save():  # after every measurement: an interrupted run loses nothing
        _write_atomically(raw_path, json.dumps(dict(cases=list(cases), results=results, load_before=load_before,
                                                    load_after=_load(), rates=rates), indent=1))

    def record(new_results):
        for result in new_results:
            results.append(result)
            save()
            print("  " + json.dumps(result), flush=True)

    for case in cases.values():
        missing = [c for c in contenders if (case.name, c) not in done]
        if args.device == "cuda":  # all of a case's contenders in one process (seconds each)
            if missing:
                print(f"{case.name}: {', '.join(missing)}...", flush=True)
                record(run_in_subprocess(case, missing, args.steps, args.device, 600.0))
            continue
        for contender in missing:
            need = case.input_bytes + ESTIMATED_PEAK_LOGITS[contender] * case.logits_bytes + case.grad_bytes
            available = mem_available_bytes()
            estimate = estimated_step_s(case, rates[f"{case.dtype_name} D={case.dim}"])
            if need + (1 << 30) > available:
                record([dict(case=case.name, contender=contender,
                             skipped=f"needs ~{_fmt_bytes(need)}, {_fmt_bytes(available)} available")])
            elif contender != "fused" and estimate > args.max_step_s:
                record([dict(case=case.name, contender=contender,
                             skipped=f"step estimated at {estimate / 60:.0f} min from torch's GEMM rates here")])
            else:
                timeout = max(600.0, 4 * (args.steps + 2) * max(estimate, 1.0))
                print(f"{case.name} {contender} (estimated GEMM time {estimate:.0f} s/step)...", flush=True)
                record(run_in_subprocess(case, [contender], args.steps, args.device, timeout))
    save()
    report = format_report(list(cases.values()), results, args, load_before, _load(), rates)
    _write_atomically(out, report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
