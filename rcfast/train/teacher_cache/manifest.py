"""What a teacher cache is valid for: the run's *pins*, the manifest that stores them, and the comparison.

A cache holds teacher outputs for exact images: which images (the data
source's listing), how each was cropped and flipped in each epoch (the
augmentation plan: seed, augment, image size, the decoding backend and
device), and which teachers produced them (name, builder and its kwargs,
class count, the sha256 of the checkpoint file's bytes, the precision and
device they ran in). :func:`run_pins` computes these for a run;
``manifest.json`` stores them with the epochs covered, the storage format
(top-k, dtypes) and the layout of the files. A run whose pins differ from the
cache's in any field is refused, naming the field (:func:`check_pins`).

The manifest is JSON (data only) and is checked field by field when read: it
is untrusted input like any file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from rcfast.train.teacher_cache.store import CacheError, Layout, atomic_write, sha256_file

__all__ = ["FORMAT", "MANIFEST_NAME", "run_pins", "listing_sha256", "teacher_pins", "check_pins", "read_manifest",
           "write_manifest", "STORAGE_KEYS", "row_width"]

FORMAT = "rcfast.teacher_cache/1"
MANIFEST_NAME = "manifest.json"
STORAGE_KEYS = ("top_k", "value_dtype", "values_are", "index_dtype", "logits_dtype", "tail_temperatures")
# Caches written before the tail mass existed have no tail_temperatures: they read as null (no tail).
_OPTIONAL_STORAGE = {"tail_temperatures": None}
_MAX_MANIFEST_BYTES = 16 << 20

# What a pinned field is called in a run config, for the refusal message.
_CONFIG_KEYS = {
    "data.listing_sha256": "data.source (its image files: names, sizes or modification times)",
    "data.num_images": "data.source (its number of readable images)",
    "data.image_size": "data.image_size",
    "data.augment": "data.augment",
    "data.seed": "train.seed (the seed of the data's epoch orders and augmentations)",
    "data.backend": "data.backend (the decoder the images went through)",
    "data.device": "train.device (where images were decoded and teachers ran)",
    "data.dtype": "the images' dtype",
    "data.normalize": "the image normalisation (mean, std)",
    "teachers": "teachers (names and order)",
    "precision": "train.precision (the teachers' autocast)",
}


def listing_sha256(dataset) -> str:
    """sha256 of a dataset's readable images: relative path, size and mtime (ns) of each, in index order.

    The global image index the cache is keyed on is the position in this list,
    so any added, removed, renamed or rewritten file changes the hash. Paths are
    relative to the source folder (or the list file's folder), so a data set
    moved or copied with its modification times (``rsync -a``, ``cp -p``) keeps it.
    """
    source = Path(dataset.source)
    base = source if source.is_dir() else source.parent
    digest = hashlib.sha256()
    for path in dataset.paths:
        st = os.stat(path)
        digest.update(f"{os.path.relpath(path, base)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def teacher_pins(teachers) -> list[dict]:
    """Each teacher's identity: name, builder (+ kwargs), classes, and the sha256 of its checkpoint file."""
    pins = []
    for tc in teachers:
        path = Path(tc.checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"teacher {tc.name!r}: checkpoint file {path} does not exist")
        pins.append({"name": tc.name, "builder": tc.builder, "builder_kwargs": dict(tc.builder_kwargs),
                     "num_classes": tc.num_classes, "checkpoint_sha256": sha256_file(path)})
    return pins


def run_pins(config, dataset) -> dict:
    """The pins of a run: its proxy data as ``dataset`` (a ``ProxyImages``) reads it, and its teachers."""
    from rcfast.data import IMAGENET_MEAN, IMAGENET_STD

    data = {"listing_sha256": listing_sha256(dataset), "num_images": dataset.total_images,
            "image_size": dataset.image_size, "augment": dataset.augment, "seed": dataset.seed,
            "backend": dataset.backend, "device": dataset.device.type, "dtype": str(dataset.dtype),
            "normalize": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}
    # JSON round trip: the pins compare equal to what a manifest reads back (tuples -> lists...).
    return json.loads(json.dumps({"data": data, "teachers": teacher_pins(config.teachers),
                                  "precision": config.train.precision}))


def _first_difference(cached, run, path: str):
    if isinstance(cached, dict) and isinstance(run, dict) and path != "data.normalize":
        for key in list(cached) + [k for k in run if k not in cached]:
            found = _first_difference(cached.get(key), run.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    if path == "teachers" and isinstance(cached, list) and isinstance(run, list):
        names = ([t.get("name") for t in cached if isinstance(t, dict)], [t.get("name") for t in run])
        if names[0] != names[1]:
            return path, names[0], names[1]
        for i, (a, b) in enumerate(zip(cached, run)):
            found = _first_difference(a, b, f"teachers[{i}]")
            if found:
                return found
        return None
    return None if cached == run else (path, cached, run)


def _describe(path: str) -> str:
    if path in _CONFIG_KEYS:
        return _CONFIG_KEYS[path]
    if path.startswith("teachers[") and path.endswith(".checkpoint_sha256"):
        return path[:-len("_sha256")] + " (the checkpoint file's contents)"
    return path


def check_pins(cache_root, cached: dict, run: dict) -> None:
    """Raise :class:`CacheError` naming the first field where the cache's pins differ from the run's."""
    found = _first_difference(cached, run, "")
    if found is None:
        return
    path, was, now = found
    raise CacheError(f"teacher cache {cache_root} does not match this run: {_describe(path)} differs -- "
                     f"{path} is {was!r} in the cache but {now!r} in this run. Build a cache for this run with "
                     "`rcfast cache-teachers` (another --out), or run the teachers online (no teacher_cache)")


def _check_storage(storage, num_teachers: int | None = None) -> dict:
    if isinstance(storage, dict):
        storage = {**_OPTIONAL_STORAGE, **storage}
    if not isinstance(storage, dict) or set(storage) != set(STORAGE_KEYS):
        raise CacheError(f"manifest storage must have exactly the keys {list(STORAGE_KEYS)}")
    tail = storage["tail_temperatures"]
    if tail is not None and (not isinstance(tail, list) or not tail
                             or (num_teachers is not None and len(tail) != num_teachers)
                             or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf
                                    for t in tail)):
        raise CacheError(f"manifest storage.tail_temperatures must be null or one temperature > 0 per teacher, got "
                         f"{tail!r}")
    if storage["values_are"] not in ("logits", "logits minus the sample's max"):
        raise CacheError(f"manifest storage.values_are is {storage['values_are']!r}")
    if storage["logits_dtype"] not in ("float32", "bfloat16", "float16"):
        raise CacheError(f"manifest storage.logits_dtype is {storage['logits_dtype']!r}")
    return storage


def read_manifest(root: str | Path) -> dict:
    """``DIR/manifest.json``, checked: format, pins, epochs, storage and layout (a :class:`CacheError` otherwise)."""
    path = Path(root) / MANIFEST_NAME
    if not Path(root).is_dir():
        raise CacheError(f"teacher cache {root} does not exist (build it with `rcfast cache-teachers`)")
    if not path.is_file():
        raise CacheError(f"teacher cache {root} has no {MANIFEST_NAME}: not a teacher cache, or its build never "
                         "started")
    if path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise CacheError(f"{path} is larger than a manifest can be ({_MAX_MANIFEST_BYTES} bytes)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not a teacher cache manifest of format {FORMAT!r}")
    epochs = manifest.get("epochs")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
        raise CacheError(f"{path}: epochs must be a positive integer, got {epochs!r}")
    pins = manifest.get("pins")
    if not isinstance(pins, dict) or not isinstance(pins.get("teachers"), list) or not pins["teachers"]:
        raise CacheError(f"{path}: pins must name the teachers")
    for i, teacher in enumerate(pins["teachers"]):
        if (not isinstance(teacher, dict) or not isinstance(teacher.get("name"), str)
                or isinstance(teacher.get("num_classes"), bool) or not isinstance(teacher.get("num_classes"), int)
                or teacher["num_classes"] <= 0):
            raise CacheError(f"{path}: pins.teachers[{i}] needs a name and num_classes > 0")
    storage = _check_storage(manifest.get("storage"), len(pins["teachers"]))
    manifest["storage"] = storage
    layout = Layout.from_dict(manifest.get("layout"))
    sizes = [t["num_classes"] for t in pins["teachers"]]
    top_k = storage["top_k"]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
        raise CacheError(f"{path}: storage.top_k must be a positive integer, got {top_k!r}")
    dense = top_k >= max(sizes)
    if dense and storage["tail_temperatures"] is not None:
        raise CacheError(f"{path}: a dense cache has no tail (storage.tail_temperatures must be null)")
    width = row_width(sizes, top_k, storage["tail_temperatures"] is not None)
    if layout.row_width != width or (layout.index_dtype is None) != dense:
        raise CacheError(f"{path}: the layout (row_width={layout.row_width}, index_dtype={layout.index_dtype}) does "
                         f"not fit {'a dense' if dense else f'a top-{top_k}'} cache of teachers with {sizes} classes")
    manifest["layout"] = layout
    return manifest


def row_width(sizes: list[int], top_k: int, tail: bool) -> int:
    """Values per (epoch, sample): every logit (dense), ``k`` per teacher, or ``k + 1`` with the tail's fill."""
    if top_k >= max(sizes):
        return sum(sizes)
    return len(sizes) * (top_k + (1 if tail else 0))


def write_manifest(root: str | Path, pins: dict, epochs: int, storage: dict, layout: Layout,
                   extra: dict | None = None) -> None:
    """Write ``DIR/manifest.json`` atomically."""
    manifest = {"format": FORMAT, "epochs": epochs, "pins": pins, "storage": _check_storage(dict(storage)),
                "layout": layout.to_dict(), **(extra or {})}
    atomic_write(Path(root) / MANIFEST_NAME, [json.dumps(manifest, indent=1).encode()])
