"""Benchmark: training-augmentation throughput of the proxy-image pipelines.

Decode + RandomResizedCrop(224) + horizontal flip + normalise, batches of 64,
over ~500 real-sized JPEGs (500x375 crops of scikit-learn's two sample
photographs, generated once into the rcfast cache), with 2 worker threads or
processes for every variant:

- `pil_torchvision`: the honest baseline, torchvision's PIL recipe written out
  (torchvision itself is not installed: it would pull another torch): PIL
  open/convert, RandomResizedCrop.get_params, crop + BILINEAR resize, flip,
  ToTensor, Normalize in a `DataLoader(num_workers=2)`;
- `rcfast_pil`: `ProxyImages(backend="pil")`;
- `rcfast_dali`: `ProxyImages(backend="dali")`, the CPU-only DALI pipeline;
- `dali_reader`: a plain DALI pipeline (`fn.readers.file` +
  `fn.decoders.image_random_crop` + resize + crop_mirror_normalize), for
  reference.

Each variant runs in its own subprocess (so peak RSS is its own), rounds are
interleaved and the median round is reported, because other work on a shared
machine moves single runs a lot. Besides images/s (wall clock), the CPU time
per image (user + sys of the process and its workers) is reported: it is what
a pipeline costs the machine and is far less sensitive to other load.

    python bench/bench_data.py [--rounds 3] [--epochs 3]

prints a markdown table and writes it to bench/results/data.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("pil_torchvision", "rcfast_pil", "rcfast_dali", "dali_reader")
NUM_IMAGES, IMAGE_W, IMAGE_H = 500, 500, 375
BATCH, SIZE, WORKERS = 64, 224, 2
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def make_jpegs(folder: Path) -> list[str]:
    """~500 500x375 JPEGs cut from the sklearn sample photographs (cached)."""
    files = sorted(str(p) for p in folder.glob("*.jpg"))
    if len(files) == NUM_IMAGES:
        return files
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    folder.mkdir(parents=True, exist_ok=True)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        photo = photos[i % len(photos)]
        w, h = photo.size
        crop_w = int(rng.integers(320, w + 1))
        crop_h = min(h, int(crop_w * IMAGE_H / IMAGE_W))
        x, y = int(rng.integers(0, w - crop_w + 1)), int(rng.integers(0, h - crop_h + 1))
        out = photo.crop((x, y, x + crop_w, y + crop_h)).resize((IMAGE_W, IMAGE_H), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.save(folder / f"{i:04d}.jpg", quality=90)
    return sorted(str(p) for p in folder.glob("*.jpg"))


# ---------------------------------------------------------------- variants
def _torchvision_like_loader(files):
    import torch
    from PIL import Image

    class RandomResizedCropFlip(torch.utils.data.Dataset):
        """torchvision's RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize on PIL."""

        def __init__(self, paths):
            self.paths = paths
            self.mean = torch.tensor(MEAN).view(3, 1, 1)
            self.std = torch.tensor(STD).view(3, 1, 1)

        def __len__(self):
            return len(self.paths)

        @staticmethod
        def get_params(width, height, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
            area = width * height
            log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
            for _ in range(10):
                target_area = area * random.uniform(*scale)
                aspect = math.exp(random.uniform(*log_ratio))
                w = int(round(math.sqrt(target_area * aspect)))
                h = int(round(math.sqrt(target_area / aspect)))
                if 0 < w <= width and 0 < h <= height:
                    return random.randint(0, height - h), random.randint(0, width - w), h, w
            return 0, 0, height, width

        def __getitem__(self, i):
            with open(self.paths[i], "rb") as f:
                img = Image.open(f).convert("RGB")
            top, left, h, w = self.get_params(*img.size)
            img = img.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
            if random.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            import numpy as np
            x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
            return (x - self.mean) / self.std

    loader = torch.utils.data.DataLoader(RandomResizedCropFlip(files), batch_size=BATCH, shuffle=True,
                                         num_workers=WORKERS, persistent_workers=True)
    return loader


def _dali_reader_iterable(files):
    import torch
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import feed_ndarray

    @pipeline_def(batch_size=BATCH, num_threads=WORKERS, device_id=None)
    def pipe():
        jpegs, _ = fn.readers.file(files=files, random_shuffle=True, seed=0, name="reader", pad_last_batch=True)
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB,
                                               random_area=(0.08, 1.0), random_aspect_ratio=(3 / 4, 4 / 3), seed=1)
        images = fn.resize(images, size=(SIZE, SIZE), antialias=True)
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                        mean=[255 * m for m in MEAN], std=[255 * s for s in STD],
                                        mirror=fn.random.coin_flip(seed=2))

    p = pipe()
    p.build()
    batches = math.ceil(len(files) / BATCH)

    class Epochs:
        def __iter__(self):
            for b in range(batches):
                (out,) = p.run()
                dense = out.as_tensor()
                t = torch.empty(dense.shape(), dtype=torch.float32)
                feed_ndarray(dense, t)
                # The reader pads the last batch to full size; trim it.
                yield t[: min(BATCH, len(files) - b * BATCH)]
            p.reset()

    return Epochs()


def run_variant(variant: str, folder: str, epochs: int) -> dict:
    """Warm-up epoch, then `epochs` timed epochs; returns the measurements."""
    files = sorted(str(p) for p in Path(folder).glob("*.jpg"))
    if variant == "pil_torchvision":
        iterable = _torchvision_like_loader(files)
    elif variant == "dali_reader":
        iterable = _dali_reader_iterable(files)
    else:
        sys.path.insert(0, str(REPO))
        from rcfast.data import ProxyImages
        iterable = ProxyImages(folder, image_size=SIZE, batch_size=BATCH, augment="rrc_flip",
                               backend=variant.split("_")[1], num_threads=WORKERS, device="cpu")

    def worker_pids():
        # DataLoader workers (forked children, alive until the end, so
        # RUSAGE_CHILDREN, which counts reaped children only, would miss
        # them): read their usage from /proc. rcfast's PIL backend creates its
        # loader on the first iteration, hence the lookup here.
        if variant == "pil_torchvision":
            loader = iterable
        else:
            loader = getattr(getattr(iterable, "_runner", None), "_loader", None)
        it = getattr(loader, "_iterator", None)
        return [w.pid for w in getattr(it, "_workers", [])]

    def proc_cpu_seconds(pid):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def proc_peak_rss_mib(pid):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_seconds():
        me = resource.getrusage(resource.RUSAGE_SELF)
        return me.ru_utime + me.ru_stime + sum(proc_cpu_seconds(p) for p in worker_pids())

    for batch in iterable:  # warm-up: worker start, pipeline build, page cache
        assert batch.shape[1:] == (3, SIZE, SIZE)
    images, t0, c0 = 0, time.perf_counter(), cpu_seconds()
    for _ in range(epochs):
        for batch in iterable:
            images += batch.shape[0]
    wall = time.perf_counter() - t0
    cpu = cpu_seconds() - c0
    workers_rss = [proc_peak_rss_mib(p) for p in worker_pids()]
    return {"variant": variant, "images": images, "seconds": wall, "images_per_s": images / wall,
            "cpu_ms_per_image": 1e3 * cpu / images,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_rss_mib": max(workers_rss, default=0.0), "workers": len(workers_rss)}


NOTES = """
Notes:
- images/s is wall clock and moves with whatever else runs on the machine (the
  2-core development machine is shared); CPU ms / image (user + sys of the
  process and its DataLoader workers, read from /proc) is what a pipeline costs
  and is the steadier figure.
- `rcfast_dali` on a CPU: one DALI pipeline for the whole run (it runs on
  into the next epoch instead of draining and being rebuilt per epoch); DALI
  decodes only each crop box (`fn.decoders.image_slice`), torch's uint8
  antialiased bilinear resize finishes the images (DALI's CPU `fn.resize` cost
  ~2 ms/image here, more than the decode); it matches PIL to one grey level.
  `dali_reader` is the plain all-DALI graph for comparison.
- Peak RSS: DALI's libraries and buffers live in the main process; the PIL
  variants add one process per worker (shared library pages are counted in
  each worker's RSS).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "data.md"))
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: one variant in this process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run:
        print(json.dumps(run_variant(args.run, args.folder, args.epochs)))
        return

    sys.path.insert(0, str(REPO))
    from rcfast.data.sources import cache_dir
    folder = cache_dir() / "bench_jpegs_500x375"
    make_jpegs(folder)
    variants = args.variants.split(",")
    results = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:  # interleaved, so slow periods of the machine hit all variants
            proc = subprocess.run([sys.executable, __file__, "--run", v, "--folder", str(folder),
                                   "--epochs", str(args.epochs)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"variant {v} failed:\n{proc.stderr}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results[v].append(res)
            print(f"round {r + 1}/{args.rounds} {v:16s} {res['images_per_s']:7.1f} img/s "
                  f"{res['cpu_ms_per_image']:5.2f} ms CPU/img", file=sys.stderr)

    base = statistics.median(x["images_per_s"] for x in results["pil_torchvision"]) \
        if "pil_torchvision" in results else None
    base_cpu = statistics.median(x["cpu_ms_per_image"] for x in results["pil_torchvision"]) \
        if "pil_torchvision" in results else None
    lines = [
        f"# Proxy-image pipeline throughput\n",
        f"Decode + RandomResizedCrop({SIZE}) + flip + normalise to float32 NCHW, batch {BATCH}, "
        f"{NUM_IMAGES} JPEGs of {IMAGE_W}x{IMAGE_H}, {WORKERS} worker threads/processes each; "
        f"{args.epochs} epochs after a warm-up epoch, median of {args.rounds} interleaved rounds "
        f"(each variant in its own process). Machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}.\n",
        "| pipeline | images/s (median) | rounds (images/s) | vs PIL baseline | CPU ms / image | CPU efficiency vs baseline | peak RSS main (MiB) | peak RSS per worker (MiB) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        runs = results[v]
        ips = statistics.median(x["images_per_s"] for x in runs)
        cpu = statistics.median(x["cpu_ms_per_image"] for x in runs)
        rss = max(x["peak_rss_mib"] for x in runs)
        wrss = max(x["worker_peak_rss_mib"] for x in runs)
        ratio = f"{ips / base:.2f}x" if base else "-"
        eff = f"{base_cpu / cpu:.2f}x" if base_cpu else "-"
        rounds = ", ".join(f"{x['images_per_s']:.0f}" for x in runs)
        lines.append(f"| {v} | {ips:.0f} | {rounds} | {ratio} | {cpu:.2f} | {eff} | {rss:.0f} | "
                     f"{wrss:.0f} |" if wrss else f"| {v} | {ips:.0f} | {rounds} | {ratio} | {cpu:.2f} | {eff} | {rss:.0f} | - |")
    if base:
        per_round = [f"{r['images_per_s'] / b['images_per_s']:.2f}x"
                     for r, b in zip(results.get("rcfast_dali", []), results["pil_torchvision"])]
        if per_round:
            lines.append(f"\nrcfast_dali / pil_torchvision per round (same round, run back to back): "
                         f"{', '.join(per_round)}.")
    lines.append(NOTES)
    lines.append("\nReproduce: `python bench/bench_data.py` (from the repository root, in the project venv).")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
