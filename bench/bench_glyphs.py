"""Benchmark: how fast the glyph data set (`rcfast.data.glyphs`) is built on this machine.

Measured in one process, each step on fresh folders:

- the glyph catalogue of matplotlib's fonts, cold (an empty cache: every
  candidate glyph of every font rendered, checked and compared once) and
  warm (read back from the cache);
- rendering throughput: `--classes` Latin classes x `--images` images at
  `--image-size` pixels, written as PNG files, with 1 and with 2 worker
  processes (wall clock, including process start-up; CPU ms per image for
  the in-process run);
- a protocol-sized layout (`protocol_layout`): what the transfer benchmark
  (issue 10) needs -- a generalist over Latin + Greek + Cyrillic, two
  specialist scripts with held-out classes, a script nobody trains on,
  few-shot splits and unlabeled proxy images -- built with the default
  number of workers.

The machine's load average is printed with the figures: on a shared machine
they move a lot, so compare them with the load they were taken under.

    python bench/bench_glyphs.py [--classes 400] [--images 60] [--image-size 32] [--sheet docs/glyphs_samples.png]

prints a markdown report and writes it to bench/results/glyphs.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rcfast.data.glyphs import contact_sheet, glyph_dataset, load_catalog, split_classes  # noqa: E402
from rcfast.data.glyphs import catalog as catalog_module  # noqa: E402


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def protocol_layout(seed: int = 0) -> dict[str, dict]:
    """The data one seed of the transfer benchmark needs: {folder: glyph_dataset kwargs}."""
    general, general_future = split_classes(["Latin", "Greek", "Cyrillic"], [300, 100], seed=seed)
    georgian, georgian_future = split_classes("Georgian", [70, 49], seed=seed)
    arabic, arabic_future = split_classes("Arabic", [80, 49], seed=seed)
    unused = split_classes("Canadian Aboriginal", [100], seed=seed)[0]
    teacher_splits = {"train": 40, "test": 20}
    probe_splits = {"train20": 20, "test": 20, "train5": range(0, 5)}  # 5-shot: the first 5 of the 20
    return {
        "general": dict(classes=general, splits=teacher_splits),
        "georgian": dict(classes=georgian, splits=teacher_splits),
        "arabic": dict(classes=arabic, splits=teacher_splits),
        "proxy": dict(classes=general + georgian + arabic, splits={"proxy": range(1000, 1010)}, labeled=False),
        "future_general": dict(classes=general_future, splits=probe_splits),
        "future_georgian": dict(classes=georgian_future, splits=probe_splits),
        "future_arabic": dict(classes=arabic_future, splits=probe_splits),
        "unused_canadian": dict(classes=unused, splits=probe_splits),
    }


def _render(root: Path, workers: int, **kwargs) -> tuple[int, float, float]:
    shutil.rmtree(root, ignore_errors=True)
    wall, cpu = time.perf_counter(), _cpu_seconds()
    ds = glyph_dataset(root, num_workers=workers, **kwargs)
    return sum(ds.num_images.values()), time.perf_counter() - wall, _cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=400)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--sheet", type=Path, default=None, help="also save a contact sheet PNG here")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "glyphs.md")
    args = parser.parse_args()

    lines = [f"# Glyph data set build times ({os.cpu_count()} cores; load average before: "
             f"{', '.join(f'{x:.1f}' for x in os.getloadavg())})", ""]
    with tempfile.TemporaryDirectory(prefix="bench-glyphs-") as tmp:
        tmp = Path(tmp)
        os.environ["RCFAST_CACHE_DIR"] = str(tmp / "cache")  # cold catalogue
        start = time.perf_counter()
        catalog = load_catalog()
        cold = time.perf_counter() - start
        catalog_module._MEMO.clear()
        start = time.perf_counter()
        load_catalog()
        warm = time.perf_counter() - start
        lines += [f"- catalogue of {len(catalog.fonts)} matplotlib fonts ({len(catalog.classes)} classes, "
                  f"{len(catalog.counts())} scripts): cold {cold:.1f} s, warm {warm:.2f} s", ""]

        classes = split_classes("Latin", [args.classes], seed=0)[0]
        lines += [f"Rendering {args.classes} classes x {args.images} images at {args.image_size}x"
                  f"{args.image_size} (PNG files):", "",
                  "| processes | images | wall s | images/s | CPU ms/image (this process) |",
                  "|---|---|---|---|---|"]
        for workers in (1, 2):
            n, wall, cpu = _render(tmp / f"latin{workers}", workers, classes=classes,
                                   splits={"all": args.images}, image_size=args.image_size)
            cpu_note = f"{1000 * cpu / n:.2f}" if workers == 1 else "(in workers)"
            lines.append(f"| {workers} | {n} | {wall:.1f} | {n / wall:.0f} | {cpu_note} |")
            print(lines[-1], flush=True)

        layout = protocol_layout()
        total, start = 0, time.perf_counter()
        for name, kwargs in layout.items():
            ds = glyph_dataset(tmp / "protocol" / name, image_size=args.image_size, **kwargs)
            total += sum(ds.num_images.values())
        wall = time.perf_counter() - start
        lines += ["", f"Protocol-sized layout ({len(layout)} data sets, {total} images, default workers): "
                  f"{wall:.1f} s ({total / wall:.0f} images/s)", "",
                  f"Load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}"]

        if args.sheet is not None:
            contact_sheet(args.sheet, per_script=12, image_size=args.image_size)
            lines += ["", f"Contact sheet: {args.sheet} ({args.sheet.stat().st_size // 1024} KB)"]

    report = "\n".join(lines) + "\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
