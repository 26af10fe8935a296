"""Benchmark: ``rcfast.ops.sinkhorn`` on a batch of problems vs a loop of POT's ``ot.sinkhorn2``.

Cases: B = 256 problems of size M = N = 100 and M = N = 1000, float32 and
float64. Each problem has its own random histograms ``a``, ``b``; the cost is
shared (squared distances between two random 2-D point clouds, scaled to
[0, 1]) -- the distillation set-up, where the class cost matrix is fixed and
every row of the batch brings its own pair of predictions. ``eps = 0.05`` and
the same stopping rule for everyone: the L2 error of the plan's column sums
below ``tol = 1e-6``, checked every 10 iterations (POT's ``stopThr`` rule).

Contenders, all on ``--threads`` CPU threads (torch and the BLAS under NumPy):

- ``rcfast``: ``rcfast.ops.sinkhorn(a [B, M], b [B, N], cost [M, N])``, one call;
- ``pot``: ``[ot.sinkhorn2(a[i], b[i], cost, eps) for i in range(B)]`` on NumPy
  arrays (POT's default solver, Sinkhorn-Knopp in the exp domain);
- ``pot_log``: the same loop with ``method="sinkhorn_log"`` (POT's log-domain
  solver: the algorithm rcfast runs);
- ``eager``: the textbook batched log-domain iteration in PyTorch
  (``torch.logsumexp`` over ``[B, M, N]`` twice per iteration);
- ``compile``: ``torch.compile`` of that iteration (compilation excluded).

Where a contender would take minutes (``pot_log``, ``eager``, ``compile`` at
M = N = 1000) it runs on the first ``--subset`` problems and its time is scaled
by ``B / subset`` (per-problem loops are linear in B; so is the batched
iteration at this size); the table marks those rows. ``max |err|`` is each
contender's largest deviation from a float64 POT log-domain solution at
``tol = 1e-12`` (on the problems it solved). The ratio column is the
contender's time over rcfast's.

    python bench/bench_sinkhorn.py [--threads 1] [--subset 16] [--skip-compile] [--out bench/results/sinkhorn_cpu.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `python bench/bench_sinkhorn.py` from a checkout
    sys.path.insert(0, REPO_ROOT)

from rcfast.ops import sinkhorn  # noqa: E402

EPS, TOL, BATCH, CHECK_EVERY = 0.05, 1e-6, 256, 10
SIZES = (100, 1000)
DTYPES = (torch.float32, torch.float64)


def make_problems(size: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(size, 2, generator=g, dtype=torch.float64), torch.rand(size, 2, generator=g, dtype=torch.float64)
    cost = torch.cdist(x, y) ** 2
    cost /= cost.max()
    a = torch.rand(BATCH, size, generator=g, dtype=torch.float64) + 0.01
    b = torch.rand(BATCH, size, generator=g, dtype=torch.float64) + 0.01
    return (a / a.sum(1, keepdim=True)).to(dtype), (b / b.sum(1, keepdim=True)).to(dtype), cost.to(dtype)


def textbook_step(log_kernel, u, v, log_a, log_b):
    v = log_b - torch.logsumexp(log_kernel + u.unsqueeze(2), dim=1)
    u = log_a - torch.logsumexp(log_kernel + v.unsqueeze(1), dim=2)
    column_error = torch.linalg.vector_norm(
        torch.exp(torch.logsumexp(log_kernel + u.unsqueeze(2), dim=1) + v) - log_b.exp(), dim=1)
    return u, v, column_error


def textbook_sinkhorn(a, b, cost, step=textbook_step, max_iters=1000):
    """The plain batched log-domain iteration, same stopping rule as rcfast/POT."""
    log_kernel = (-cost / EPS).unsqueeze(0)
    log_a, log_b = a.log(), b.log()
    u, v = torch.zeros_like(a), torch.zeros_like(b)
    for it in range(max_iters):
        u, v, error = step(log_kernel, u, v, log_a, log_b)
        if it % CHECK_EVERY == 0 and error.max() < TOL:
            break
    plan = torch.exp(log_kernel + u.unsqueeze(2) + v.unsqueeze(1))
    return (plan * cost).sum(dim=(1, 2))


def pot_loop(a, b, cost, method):
    import ot

    a, b, cost = a.numpy(), b.numpy(), cost.numpy()
    return np.array([float(ot.sinkhorn2(a[i], b[i], cost, EPS, method=method, stopThr=TOL, numItermax=1000))
                     for i in range(a.shape[0])])


def reference_values(a, b, cost, count):
    import ot

    # Renormalised in float64: float32 masses do not sum to 1 exactly there, and a balanced
    # problem with unequal masses never meets a 1e-12 marginal tolerance.
    a, b = (x.double() / x.double().sum(1, keepdim=True) for x in (a, b))
    a, b, cost = a.numpy(), b.numpy(), cost.double().numpy()
    return np.array([float(ot.sinkhorn2(a[i], b[i], cost, EPS, method="sinkhorn_log", stopThr=1e-12,
                                        numItermax=100_000)) for i in range(count)])


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def run_case(size, dtype, args, compiled_step):
    a, b, cost = make_problems(size, dtype)
    big = size >= 1000
    subset = args.subset if big else BATCH
    repeats = 1 if big else args.repeats
    contenders = {
        "rcfast": (BATCH, lambda: sinkhorn(a, b, cost, eps=EPS, tol=TOL)),
        "pot": (BATCH, lambda: pot_loop(a, b, cost, "sinkhorn")),
        "pot_log": (subset, lambda: pot_loop(a[:subset], b[:subset], cost, "sinkhorn_log")),
        "eager": (subset, lambda: textbook_sinkhorn(a[:subset], b[:subset], cost)),
    }
    if compiled_step is not None:
        contenders["compile"] = (subset, lambda: textbook_sinkhorn(a[:subset], b[:subset], cost, step=compiled_step))
    reference = reference_values(a, b, cost, args.reference_count)
    rows = {}
    for name, (count, fn) in contenders.items():
        first = 0.0
        if name == "compile":  # compilation (first call) excluded, reported
            start = time.perf_counter()
            fn()
            first = time.perf_counter() - start
        seconds, values = timed(fn, repeats)
        print(f"  {name}: {seconds:.3f} s for {count} problems", flush=True)  # progress of a long run
        values = np.asarray(torch.as_tensor(values).double())
        checked = min(len(values), len(reference))
        rows[name] = {"seconds": seconds * BATCH / count, "scaled": count != BATCH, "count": count,
                      "error": float(np.abs(values[:checked] - reference[:checked]).max()), "first": first}
    for row in rows.values():
        row["ratio"] = row["seconds"] / rows["rcfast"]["seconds"]
    return rows


def format_report(results, args, load_before, load_after) -> str:
    lines = [
        "# Batched Sinkhorn vs a loop of POT's ot.sinkhorn2",
        "",
        "Generated by `python bench/bench_sinkhorn.py` (see its docstring for the method).",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"POT {__import__('ot').__version__}, {args.threads} thread(s) for torch and NumPy's BLAS",
        f"- load average before / after: {load_before} / {load_after} (other work shares this machine)",
        f"- B = {BATCH} problems, shared cost (squared distances, scaled to [0, 1]), eps = {EPS}, "
        f"tol = {TOL} on the column-sum L2 error, checked every {CHECK_EVERY} iterations, for every contender",
        f"- time: median of {args.repeats} runs for M = N = 100, one run for M = N = 1000; rows marked * ran "
        f"{args.subset} of the {BATCH} problems and are scaled by {BATCH // args.subset}",
        f"- max |err|: against POT's float64 log-domain solution at tol 1e-12 (first {args.reference_count} problems)",
        "",
        "| M = N | dtype | contender | seconds for B = 256 | time / rcfast | max abs err | compile s |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for (size, dtype), rows in results.items():
        for name, row in rows.items():
            mark = "*" if row["scaled"] else ""
            compile_s = f"{row['first']:.1f}" if name == "compile" else ""
            lines.append(f"| {size} | {str(dtype).replace('torch.', '')} | {name} | {row['seconds']:.3f}{mark} | "
                         f"{row['ratio']:.2f}x | {row['error']:.1e} | {compile_s} |")
    lines += ["", "Speed-ups of rcfast (the contender's time / rcfast's time):", ""]
    for (size, dtype), rows in results.items():
        lines.append(f"- M = N = {size}, {str(dtype).replace('torch.', '')}: {rows['pot']['ratio']:.1f}x vs "
                     f"`ot.sinkhorn2`, {rows['pot_log']['ratio']:.1f}x vs `ot.sinkhorn2(method='sinkhorn_log')`, "
                     f"{rows['eager']['ratio']:.1f}x vs textbook eager PyTorch")
    return "\n".join(lines) + "\n"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())  # Linux: the report says how busy the machine was


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender at M = N = 100")
    parser.add_argument("--subset", type=int, default=16, help="problems run by the slow contenders at 1000")
    parser.add_argument("--reference-count", type=int, default=16, help="problems checked against the reference")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile contender")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results", "sinkhorn_cpu.md"))
    args = parser.parse_args(argv)
    if BATCH % args.subset:
        parser.error(f"--subset must divide {BATCH}")

    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)  # this script owns its process
    load_before = _load()
    compiled_step = None if args.skip_compile else torch.compile(textbook_step, dynamic=False)
    results = {}
    with threadpool_limits(limits=args.threads):
        for size in args.sizes:
            for dtype in DTYPES:
                results[(size, dtype)] = run_case(size, dtype, args, compiled_step)
                rows = results[(size, dtype)]
                print(f"M=N={size} {dtype}: " + ", ".join(f"{k} {v['seconds']:.3f}s" for k, v in rows.items()),
                      flush=True)
    report = format_report(results, args, load_before, _load())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
