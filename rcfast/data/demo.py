"""The embedded demo data: scikit-learn's handwritten digits as small image folders.

`demo_dataset(root)` turns `sklearn.datasets.load_digits()` (1,797 8x8 grey
images shipped inside scikit-learn; nothing is downloaded) into 32x32 RGB PNG
files laid out for the consolidation demo. Each digit class is split on its
own (stratified) with a fixed seed:

- 40 % teacher pool, split 80/20 into train/test:
  - `teacher_all/{train,test}/<digit>/`: the generalist teacher, digits 0-9;
  - `task_a/{train,test}/<digit>/`: task-specific teacher A, digits 0-4;
  - `task_b/{train,test}/<digit>/`: task-specific teacher B, digits 5-9
    (its folder labels are digit - 5, as classes are numbered in sorted order);
- 35 % `proxy/`: unlabeled proxy images (one flat folder), never seen by a
  teacher: the distillation data;
- 25 % held-out downstream pool, split 2/3 train, 1/3 test, for linear-probe
  transfer, as three tasks on the same held-out digits:
  - `downstream/parity/{train,test}/{even,odd}/`;
  - `downstream/loops/{train,test}/{loop,no_loop}/` (0, 6, 8, 9 have closed
    loops);
  - `downstream/inverted_tinted/{train,test}/<digit>/`: the ten digits in a
    new domain, dark ink on a light background tinted a random colour per
    image.

File names are the digit's index in `load_digits()` (`0042.png`), so the
splits can be checked for disjointness. Files of the same image in several
splits are hard links where the file system allows. A `manifest.json`
written last makes the call idempotent: a later call finds it and returns at
once without writing anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

DEMO_VERSION = 1
SPLIT_SEED = 20240607
IMAGE_SIZE = 32
TEACHER_FRACTION, PROXY_FRACTION = 0.40, 0.35   # the rest is the downstream pool
TEACHER_TRAIN_FRACTION = 0.8
DOWNSTREAM_TRAIN_FRACTION = 2.0 / 3.0
LOOP_DIGITS = (0, 6, 8, 9)
MANIFEST = "manifest.json"
_TOP_LEVEL = ("teacher_all", "task_a", "task_b", "proxy", "downstream")


def _render(pixels8x8: np.ndarray) -> Image.Image:
    """An 8x8 digit (values 0-16) as a 32x32 RGB image, bright ink on black."""
    grey = Image.fromarray(np.rint(pixels8x8 * (255.0 / 16.0)).astype(np.uint8), mode="L")
    return grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR).convert("RGB")


def _render_inverted_tinted(pixels8x8: np.ndarray, tint: np.ndarray) -> Image.Image:
    grey = np.asarray(_render(pixels8x8).convert("L"), dtype=np.float32) / 255.0
    rgb = (1.0 - grey)[..., None] * tint[None, None, :]
    return Image.fromarray(np.rint(rgb * 255.0).astype(np.uint8), mode="RGB")


def _split(targets: np.ndarray, rng: np.random.Generator):
    """Stratified index split: teacher train/test, proxy, downstream train/test."""
    parts = {k: [] for k in ("teacher_train", "teacher_test", "proxy", "down_train", "down_test")}
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(targets == digit))
        n_teacher = int(round(len(idx) * TEACHER_FRACTION))
        n_proxy = int(round(len(idx) * PROXY_FRACTION))
        teacher, proxy, down = idx[:n_teacher], idx[n_teacher:n_teacher + n_proxy], idx[n_teacher + n_proxy:]
        n_tt = int(round(len(teacher) * TEACHER_TRAIN_FRACTION))
        n_dt = int(round(len(down) * DOWNSTREAM_TRAIN_FRACTION))
        parts["teacher_train"] += teacher[:n_tt].tolist()
        parts["teacher_test"] += teacher[n_tt:].tolist()
        parts["proxy"] += proxy.tolist()
        parts["down_train"] += down[:n_dt].tolist()
        parts["down_test"] += down[n_dt:].tolist()
    return {k: sorted(v) for k, v in parts.items()}


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # no hard links here (e.g. another file system): copy
        shutil.copyfile(src, dst)


def _task(root: Path, name: str, classes: list[str], counts: dict) -> dict:
    return {"train": str(root / name / "train"), "test": str(root / name / "test"),
            "classes": classes, "num_train": counts["train"], "num_test": counts["test"]}


def _absolute(manifest: dict, root: Path) -> dict:
    """The stored manifest (relative paths) with absolute paths under root."""
    def walk(node):
        if isinstance(node, dict):
            return {k: (str(root / v) if k in ("train", "test", "path") else walk(v)) for k, v in node.items()}
        return node
    out = walk(manifest)
    out["root"] = str(root)
    return out


def _write(build: Path, split_seed: int) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images, digits.target
    parts = _split(targets, np.random.default_rng(split_seed))

    def save(img: Image.Image, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="PNG")

    counts = {}
    # Teachers: all ten digits, and the two five-digit tasks as hard links.
    for split in ("train", "test"):
        for i in parts[f"teacher_{split}"]:
            digit = str(targets[i])
            path = build / "teacher_all" / split / digit / f"{i:04d}.png"
            save(_render(images[i]), path)
            task = "task_a" if targets[i] <= 4 else "task_b"
            _link(path, build / task / split / digit / f"{i:04d}.png")
    for name in ("teacher_all", "task_a", "task_b"):
        counts[name] = {s: sum(1 for _ in (build / name / s).rglob("*.png")) for s in ("train", "test")}

    for i in parts["proxy"]:
        save(_render(images[i]), build / "proxy" / f"{i:04d}.png")

    tint_rng = np.random.default_rng([split_seed, 1])
    down = build / "downstream"
    for split in ("train", "test"):
        for i in parts[f"down_{split}"]:
            digit = int(targets[i])
            parity = build / "downstream" / "parity" / split / ("even" if digit % 2 == 0 else "odd") / f"{i:04d}.png"
            save(_render(images[i]), parity)
            _link(parity, down / "loops" / split / ("loop" if digit in LOOP_DIGITS else "no_loop") / f"{i:04d}.png")
            tint = tint_rng.uniform(0.35, 1.0, size=3)
            save(_render_inverted_tinted(images[i], tint),
                 down / "inverted_tinted" / split / str(digit) / f"{i:04d}.png")
    down_counts = {s: len(parts[f"down_{s}"]) for s in ("train", "test")}

    manifest = {
        "version": DEMO_VERSION, "split_seed": split_seed, "image_size": IMAGE_SIZE,
        "source": "sklearn.datasets.load_digits", "num_source_images": int(len(targets)),
        "teacher_all": _task(Path(""), "teacher_all", [str(d) for d in range(10)], counts["teacher_all"]),
        "task_a": _task(Path(""), "task_a", [str(d) for d in range(5)], counts["task_a"]),
        "task_b": _task(Path(""), "task_b", [str(d) for d in range(5, 10)], counts["task_b"]),
        "proxy": {"path": "proxy", "num_images": len(parts["proxy"])},
        "downstream": {
            "parity": _task(Path("downstream"), "parity", ["even", "odd"], down_counts),
            "loops": _task(Path("downstream"), "loops", ["loop", "no_loop"], down_counts),
            "inverted_tinted": _task(Path("downstream"), "inverted_tinted",
                                     [str(d) for d in range(10)], down_counts),
        },
    }
    return manifest


def demo_dataset(root, split_seed: int = SPLIT_SEED) -> dict:
    """Write (once) the digits demo data under `root` and return its manifest.

    The manifest is a dict with absolute paths and counts:
    `teacher_all`, `task_a`, `task_b` and each of `downstream["parity"]`,
    `downstream["loops"]`, `downstream["inverted_tinted"]` hold
    `{"train", "test", "classes", "num_train", "num_test"}` (class folders
    under train/ and test/); `proxy` holds `{"path", "num_images"}` (a flat
    folder of unlabeled images). See the module docstring for the split.
    A second call with the same root returns the stored manifest without
    writing.
    """
    root = Path(root).expanduser().resolve()
    manifest_path = root / MANIFEST
    if manifest_path.exists():
        with open(manifest_path, encoding="utf-8") as f:
            stored = json.load(f)
        if stored.get("version") == DEMO_VERSION and stored.get("split_seed") == split_seed:
            return _absolute(stored, root)
    root.mkdir(parents=True, exist_ok=True)
    # Built in a private folder and moved in, manifest last: an interrupted or
    # concurrent call (several DDP ranks) never leaves a half-written split
    # that a later call would mistake for a finished one.
    build = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=root))
    try:
        manifest = _write(build, split_seed)
        for name in _TOP_LEVEL:
            target = root / name
            if target.exists():
                shutil.rmtree(target)  # a stale or older-version split from an earlier call
            os.replace(build / name, target)
        tmp_manifest = build / MANIFEST
        with open(tmp_manifest, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        os.replace(tmp_manifest, manifest_path)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return _absolute(manifest, root)
