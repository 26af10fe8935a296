"""Benchmark: training throughput of a RepCon run with online teachers vs a teacher cache (dense, top-k).

A RepCon run distils three teachers (two task teachers of 200 classes and a
generalist of 1000) into a ``small_cnn`` student with one head each, on
unlabeled proxy images (``ProxyImages``, ``rrc_flip``, the run's default data
backend). Two teacher sets:

- ``same``: the teachers have the student's architecture;
- ``2x``: wider teachers whose forward takes about twice the student's
  forward time on a 2-core x86 CPU (width x 50/32; both ratios are measured
  and printed: the FLOP ratio, counted with ``torch.utils.flop_counter``, is
  higher, about 2.4x, because wider convolutions use the CPU better -- a
  teacher of twice the FLOPs costs only about 1.6x the time here).

For each set, five variants of the same run: ``online`` (teachers run every
step), ``dense`` (a dense fp32 cache: every logit), ``top8`` and ``top32``
(top-k fp16 caches, ``tail_mass=False``: the sparse top-k loss) and
``top8_tail`` (top-8 fp16 with its tail mass, the default of a top-k cache: the
loss then runs on the densified teacher). Each variant is its own process (so its peak RSS is its
own), built once; then rounds are interleaved -- every variant runs the same
number of steps back to back, in a rotating order, one at a time -- and the
median round is reported with each round's ratio to ``online`` in the same
round, because other work on a shared machine moves single runs a lot. The
caches' size per image and build time are measured too, and -- after the
rounds, in the online process -- the teachers' forward and the drawing of a
batch, each timed alone: a cache removes the teachers' forward and nothing
else, so ``online step / (online step - teachers' forward)`` is the ceiling of
any cache for this run, printed beside what the caches reached.

    python bench/bench_train.py [--quick] [--rounds 15] [--steps 6] [--device auto]

prints a markdown table (and, without --quick, writes bench/results/train.md);
the last line is ``train throughput: cached top-k <X>x online`` with X the
smallest median ratio of the top-k variants (top-8, top-32, top-8 with its tail
mass) with same-size teachers.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEACHER_CLASSES = {"task_a": 200, "task_b": 200, "generalist": 1000}
# Teacher width / student width: "2x" teachers take about twice the student's forward time (see the docstring).
WIDTH_SCALE = {"same": 1.0, "2x": 50 / 32}
VARIANTS = ("online", "dense", "top8", "top32", "top8_tail")
TOP_K_VARIANTS = ("top8", "top32", "top8_tail")
CACHES = {"dense": {"top_k": None, "dtype": "fp32"}, "top8": {"top_k": 8, "dtype": "fp16", "tail_mass": False},
          "top32": {"top_k": 32, "dtype": "fp16", "tail_mass": False},
          "top8_tail": {"top_k": 8, "dtype": "fp16", "tail_mass": True}}


def _settings(quick: bool) -> dict:
    if quick:
        return {"width": 16, "images": 256, "image_px": 40, "image_size": 32, "batch": 32}
    return {"width": 32, "images": 1024, "image_px": 48, "image_size": 32, "batch": 64}


def make_images(folder: Path, count: int, side: int) -> None:
    """Smooth random pictures as PNGs (their content does not matter for throughput)."""
    import numpy as np
    from PIL import Image

    if len(list(folder.glob("*.png"))) == count:
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    for i in range(count):
        f = rng.uniform(0.05, 0.5, size=(3, 2))
        rgb = np.stack([(np.sin(x * f[c, 0] + y * f[c, 1] + i) + 1) * 127 for c in range(3)], axis=-1)
        Image.fromarray(rgb.astype(np.uint8)).save(folder / f"{i:05d}.png")


def forward_flops(model, image_size: int) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops()


def make_run(work: Path, teacher_set: str, s: dict, steps: int, device: str) -> tuple[dict, float]:
    """The run config (a dict) of one teacher set, its teacher checkpoints, and the teacher/student FLOP ratio."""
    import torch

    from rcfast.models import build_classifier, build_model

    student_width = s["width"]
    teacher_width = round(student_width * WIDTH_SCALE[teacher_set])
    torch.manual_seed(0)
    teachers = []
    for name, classes in TEACHER_CLASSES.items():
        path = work / f"{teacher_set}_{name}.pt"
        model = build_classifier("small_cnn", classes, width=teacher_width)
        torch.save(model.state_dict(), path)
        teachers.append({"name": name, "builder": "small_cnn", "builder_kwargs": {"width": teacher_width},
                         "checkpoint": str(path), "num_classes": classes})
    ratio = (forward_flops(build_model("small_cnn", width=teacher_width), s["image_size"])
             / forward_flops(build_model("small_cnn", width=student_width), s["image_size"]))
    config = {
        "student": {"backbone": "small_cnn", "backbone_kwargs": {"width": student_width}},
        "teachers": teachers,
        "data": {"source": str(work / "images"), "image_size": s["image_size"], "batch_size": s["batch"],
                 "augment": "rrc_flip", "num_threads": 1, "drop_last": True},
        "objective": [{"term": "multihead_kd", "temperature": 4.0}],
        "optim": {"lr": 1e-3},
        "train": {"max_steps": steps, "device": device, "seed": 0, "progress": False, "log_every": 10**6,
                  "checkpoint_every": 0, "resume": "none", "out_dir": str(work / f"run_{teacher_set}")},
    }
    return config, ratio


# ---------------------------------------------------------------- a variant's process
def child(config_path: str) -> None:
    """Build the run, then answer ``{"steps": n}`` lines with ``{"seconds", "images", "maxrss_mib"}``."""
    import torch

    from rcfast.train import Consolidator, load_config
    from rcfast.train.runtime import apply_runtime

    config = load_config(config_path)
    apply_runtime(config.train)
    trainer = Consolidator.from_config(config)
    cuda = trainer.device.type == "cuda"
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if "phases" in command:
            print(json.dumps(phase_seconds(trainer, command["phases"])), flush=True)
            continue
        steps = command["steps"]
        if steps == 0:
            break
        start, images = time.perf_counter(), 0
        for _ in range(steps):
            images += trainer.train_step()[2]
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "images": images,
                          "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
    trainer.close()


def phase_seconds(trainer, repeats: int) -> dict:
    """Seconds of a step and of parts of it, each timed alone (median of ``repeats``), the parts interleaved.

    ``step_s``: a whole training step; ``data_s``: drawing the next batch; ``teachers_s``: the teachers' forward on one
    batch, as the step requests it (online teachers only; ``None`` for a cache); ``student_forward_s``: the
    student's forward alone on the same batch (``eval()``, no gradient, as the teachers run), the unit a
    teacher's cost is measured in. Each repeat times every part once, back to back, so that the parts are
    compared under the same load (timed one part after the other, a busy moment skewed one of them).
    Caching removes ``teachers_s`` from a step and nothing else, so
    ``step_s / (step_s - teachers_s)`` is the most any cache can speed the run.
    """
    import torch

    from rcfast.train.teachers import OnlineTeachers, TeacherRequest

    def seconds(fn) -> float:
        start = time.perf_counter()
        fn()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    stream = trainer.streams["proxy"]
    parts = {"step_s": trainer.train_step, "data_s": stream.next}
    if isinstance(trainer.teachers, OnlineTeachers):
        batch = stream.next()
        images = (batch[0] if isinstance(batch, (tuple, list)) else batch).to(trainer.device)
        request = TeacherRequest(stream="proxy", step=0, images=images, teachers=tuple(trainer.teachers.num_classes))
        student = copy.deepcopy(trainer.student).eval()  # as the teachers run: eval(), no gradient

        def student_forward():
            with torch.inference_mode():
                student(images)

        parts.update(teachers_s=lambda: trainer.teachers(request), student_forward_s=student_forward)
    times: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(repeats):
        for name, fn in parts.items():
            times[name].append(seconds(fn))
    out = {"teachers_s": None, "student_forward_s": None}
    out.update({name: statistics.median(t) for name, t in times.items()})
    return out


class Variant:
    """A variant's process: built once, then asked to run steps."""

    def __init__(self, name: str, config_path: Path) -> None:
        self.name = name
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", str(config_path)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def wait_ready(self) -> None:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"variant {self.name} failed to start (exit {self.proc.wait()})")

    def _ask(self, command: dict) -> dict:
        """Send one command line to the child and read its one-line JSON answer."""
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"variant {self.name} died (exit {self.proc.wait()})")
        return json.loads(line)

    def run(self, steps: int) -> dict:
        return self._ask({"steps": steps})

    def phases(self, repeats: int) -> dict:
        return self._ask({"phases": repeats})

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"steps": 0}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=120)


# ---------------------------------------------------------------- the benchmark
def bench_teacher_set(work: Path, teacher_set: str, s: dict, args) -> dict:
    from rcfast.train import config_from_dict
    from rcfast.train.runtime import apply_runtime
    import yaml

    from rcfast.train.teacher_cache import build_teacher_cache

    total_steps = args.warmup + args.rounds * args.steps
    phase_repeats = max(9, args.steps)
    # room in the schedule for the steps phase_seconds times after the rounds
    data, flop_ratio = make_run(work, teacher_set, s, total_steps + phase_repeats, args.device)
    config = config_from_dict(json.loads(json.dumps(data)))
    apply_runtime(config.train)
    caches = {}
    for name, options in CACHES.items():
        out = work / f"cache_{teacher_set}_{name}"
        shutil.rmtree(out, ignore_errors=True)
        caches[name] = build_teacher_cache(config, out, progress=False, log=lambda *a: None, **options)
    paths = {}
    for name in VARIANTS:
        variant_data = json.loads(json.dumps(data))
        variant_data["train"]["out_dir"] = str(work / f"run_{teacher_set}_{name}")
        if name != "online":
            variant_data["teacher_cache"] = caches[name]["out"]
        paths[name] = work / f"{teacher_set}_{name}.yaml"
        paths[name].write_text(yaml.safe_dump(variant_data, sort_keys=False))
    variants = {name: Variant(name, path) for name, path in paths.items()}
    try:
        for v in variants.values():
            v.wait_ready()
        for v in variants.values():
            v.run(args.warmup)
        rounds: dict[str, list[float]] = {name: [] for name in VARIANTS}
        maxrss = {}
        for r in range(args.rounds):
            order = list(VARIANTS[r % len(VARIANTS):]) + list(VARIANTS[:r % len(VARIANTS)])
            for name in order:
                result = variants[name].run(args.steps)
                rounds[name].append(result["images"] / result["seconds"])
                maxrss[name] = result["maxrss_mib"]
            print(f"[bench_train] {teacher_set} round {r + 1}: " + ", ".join(
                f"{n} {rounds[n][-1]:.0f}" for n in VARIANTS) + " images/s", file=sys.stderr, flush=True)
        # After the rounds (which the drawn batches would otherwise shift): the online run's step parts.
        phases = variants["online"].phases(phase_repeats)
    finally:
        for v in variants.values():
            v.close()
    ratios = {name: [x / o for x, o in zip(rounds[name], rounds["online"])] for name in VARIANTS}
    phases["ceiling"] = phases["step_s"] / max(phases["step_s"] - phases["teachers_s"], 1e-12)
    phases["teacher_time_ratio"] = phases["teachers_s"] / (len(TEACHER_CLASSES) * phases["student_forward_s"])
    return {"flop_ratio": flop_ratio, "rounds": rounds, "ratios": ratios, "maxrss_mib": maxrss, "caches": caches,
            "phases": phases}


def report(results: dict, s: dict, args) -> str:
    import torch

    lines = ["# Training throughput: online teachers vs a teacher cache", "",
             f"RepCon: `small_cnn` student (width {s['width']}), three teachers ({', '.join(f'{n} {c}' for n, c in TEACHER_CLASSES.items())} classes), "
             f"{s['images']} PNG proxy images -> {s['image_size']}px `rrc_flip`, batch {s['batch']}, fp32, "
             f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{os.cpu_count()} CPUs, {platform.machine()}. {args.rounds} interleaved rounds of {args.steps} steps "
             f"after {args.warmup} warm-up steps; each variant in its own process.", "",
             "| teachers | variant | images/s (median) | vs online (median of per-round ratios) | per-round ratios, "
             "quartiles | cache bytes / image | cache build s (images/s) | peak RSS MiB |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for teacher_set, r in results.items():
        label = (f"{teacher_set} ({r['phases']['teacher_time_ratio']:.2f}x student forward time, "
                 f"{r['flop_ratio']:.2f}x FLOPs)")
        for name in VARIANTS:
            cache = r["caches"].get(name)
            built = (f"{cache['build_seconds']:.1f} ({cache['epochs'] * cache['images_per_epoch'] / cache['build_seconds']:.0f})"
                     if cache else "-")
            ratios = r["ratios"][name]
            quartiles = (statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0], ratios[0], ratios[0]])
            lines.append(f"| {label} | {name} | {statistics.median(r['rounds'][name]):.0f} | "
                         f"{statistics.median(ratios):.2f}x | {quartiles[0]:.2f}-{quartiles[2]:.2f}x | "
                         f"{cache['bytes_per_image'] if cache else '-'} | "
                         f"{built} | {r['maxrss_mib'][name]:.0f} |")
    lines += ["", "What caching can gain: the online run's step and two of its parts, each timed alone (median of "
              "several repeats) in the online process after the rounds. A cache removes the teachers' forward "
              "from a step and nothing else, so online step / (online step - teachers' forward) is the most any "
              "cache can give this run (the student's forward and backward and the data stay):", "",
              "| teachers | online step ms | teachers' forward ms | student's forward ms | drawing a batch ms | "
              "ceiling of a cache | best cached top-k | of the ceiling |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for teacher_set, r in results.items():
        p = r["phases"]
        best = max(statistics.median(r["ratios"][n]) for n in TOP_K_VARIANTS)
        lines.append(f"| {teacher_set} | {p['step_s'] * 1e3:.1f} | {p['teachers_s'] * 1e3:.1f} | "
                     f"{p['student_forward_s'] * 1e3:.1f} | {p['data_s'] * 1e3:.1f} | {p['ceiling']:.2f}x | {best:.2f}x | {best / p['ceiling']:.0%} |")
    lines += ["", "Per-round ratios to online (same round, back to back):"]
    for teacher_set, r in results.items():
        for name in VARIANTS[1:]:
            lines.append(f"- {teacher_set} {name}: {', '.join(f'{x:.2f}x' for x in r['ratios'][name])}")
    lines += ["", "The machine this ran on may be shared: ratios of interleaved rounds are the figure to read; "
              "absolute images/s move with other load.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few rounds (a minute or two)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per variant per round")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", default=None, help="where images, teachers and caches go (default: a temp dir)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    # Many short rounds: a round's ratio pairs two runs seconds apart, and the median of many is steadier.
    args.rounds = args.rounds or (3 if args.quick else 15)
    args.steps = args.steps or 6
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick else 5)
    s = _settings(args.quick)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rcfast-bench-train-"))
    try:
        make_images(work / "images", s["images"], s["image_px"])
        results = {teacher_set: bench_teacher_set(work, teacher_set, s, args) for teacher_set in ("same", "2x")}
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    text = report(results, s, args)
    print(text)
    if not args.quick:
        out = REPO / "bench" / "results" / "train.md"
        out.write_text(text + f"\nReproduce: `python bench/bench_train.py` (from the repository root).\n")
    same = results["same"]["ratios"]
    print(f"train throughput: cached top-k {min(statistics.median(same[n]) for n in TOP_K_VARIANTS):.2f}x online")


if __name__ == "__main__":
    main()
