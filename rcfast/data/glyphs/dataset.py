"""`glyph_dataset`: glyph images written as a folder tree with a manifest, built once, resumably.

Layout under `root` (like `rcfast.data.demo_dataset`):

- labeled: `<split>/<class id>/<image index:05d>.png`, e.g. `train/U+0041/00007.png`;
  the class folders are the classes, in sorted order, as `ProxyImages(labels=True)`
  and torchvision's `ImageFolder` number them;
- unlabeled (`labeled=False`, e.g. proxy data): `<split>/<k:06d>.png`, the
  split's (class, index) pairs in a seeded shuffled order, so no file name
  reveals a class;
- `manifest.json`, written last: the parameters, per-class details
  (character, script, Unicode name, fonts), counts and software versions.

Image `i` of class `c` is `GlyphRenderer.render(seed, c, i)`, whatever split
holds it: a split is a range of image indices, so `{"train": 20, "test": 20}`
gives train images 0-19 and test images 20-39 of every class, and a proxy
set taken at indices 1000 and up shares no image with them.

Build: a marker file holding the parameters is written first; every PNG is
written to a hidden temporary name and renamed into place, so a file with
its final name is always complete. An interrupted build (marker, no
manifest) is resumed when called again with the same parameters (files
already there are kept: they are byte-identical to what would be rendered)
and rebuilt from scratch otherwise. A finished root with other parameters is
refused unless `overwrite=True`; a non-empty folder that is not a glyph data
set is always refused (rcfast only deletes what it wrote).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from rcfast.atomic import atomic_write_json

from .catalog import GlyphCatalog, load_catalog
from .classes import classes_of_scripts
from .pool import default_workers, map_in_processes
from .render import GlyphRenderer, RenderParams

FORMAT = "rcfast.glyphs"
VERSION = 1
MANIFEST = "manifest.json"
MARKER = ".glyphs-build.json"
DEFAULT_SPLITS = {"train": 40, "test": 20}
_PARALLEL_MIN_IMAGES = 2000  # below this, starting worker processes costs more than it saves


@dataclass
class GlyphDataset:
    """A written glyph data set.

    `classes[i]` is the id of label i (sorted folder names, the order
    `ProxyImages(labels=True)` uses); `chars[i]` and `scripts[i]` describe it.
    `splits[name]` is the split's folder; `num_images[name]` its image count.
    """

    root: Path
    classes: list[str]
    chars: list[str]
    scripts: list[str]
    splits: dict[str, str]
    num_images: dict[str, int]
    labeled: bool
    manifest: dict

    def arrays(self, split: str):
        """A split's images as uint8 `[N, S, S, 3]` and int64 labels (None when unlabeled).

        Files are read in sorted path order, the order `ProxyImages` lists them.
        """
        if split not in self.splits:
            raise ValueError(f"split {split!r} is not one of {sorted(self.splits)}")
        folder = Path(self.splits[split])
        paths = sorted(folder.rglob("*.png"), key=lambda p: p.relative_to(folder).as_posix())
        images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
        if not self.labeled:
            return images, None
        index = {cid: i for i, cid in enumerate(self.classes)}
        return images, np.array([index[p.parent.name] for p in paths], dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Arguments


def _split_ranges(splits) -> dict[str, tuple[int, int]]:
    """{name: count | range | (start, stop)} -> {name: (start, stop)}; counts follow each other from 0."""
    if not isinstance(splits, Mapping) or not splits:
        raise TypeError(f"splits must be a non-empty dict of split name -> image count or range, got {splits!r}")
    ranges, cursor = {}, 0
    for name, value in splits.items():
        if (not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\\" in name
                or name == MANIFEST):
            raise ValueError(f"split names must be plain folder names, got {name!r}")
        if isinstance(value, range) and value.step == 1:
            start, stop = value.start, value.stop
        elif isinstance(value, tuple) and len(value) == 2:
            start, stop = value
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            start, stop = cursor, cursor + int(value)
        else:
            raise TypeError(f"splits[{name!r}] must be an image count, a range or (start, stop), got {value!r}")
        if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in (start, stop)) \
                or not 0 <= start < stop:
            raise ValueError(f"splits[{name!r}] must hold at least one image index >= 0, got {value!r}")
        ranges[name] = (int(start), int(stop))
        cursor = max(cursor, int(stop))
    return ranges


def _resolve_classes(catalog: GlyphCatalog, classes, scripts, classes_per_script, class_seed, fonts,
                     precomposed) -> list[str]:
    if (classes is None) == (scripts is None):
        raise ValueError("pass exactly one of classes (a list of class ids) and scripts")
    if classes is None:
        chosen = classes_of_scripts(catalog, scripts, classes_per_script, class_seed, fonts, precomposed)
    else:
        if classes_per_script is not None:
            raise ValueError("classes_per_script applies to scripts=, not to an explicit classes list")
        if isinstance(classes, str) or not isinstance(classes, Sequence) or not classes:
            raise TypeError(f"classes must be a non-empty list of class ids such as 'U+0041', got {classes!r}")
        unknown = [c for c in classes if c not in catalog.classes]
        if unknown:
            hint = "; ".join(f"{c} duplicates {catalog.dropped[c]}" for c in unknown[:5] if c in catalog.dropped)
            raise ValueError(f"classes not in the glyph catalogue of these fonts: {unknown[:10]}"
                             f"{' ...' if len(unknown) > 10 else ''}{' (' + hint + ')' if hint else ''}")
        chosen = list(classes)
    if len(set(chosen)) != len(chosen):
        raise ValueError("classes lists a class twice")
    return sorted(chosen)


def _check_seed(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# Files


def _unlabeled_names(spec: dict, split: str) -> dict[tuple[int, int], str]:
    """(class position, image index) -> file name, in a seeded order that hides the class."""
    start, stop = spec["splits"][split]
    pairs = [(c, i) for c in range(len(spec["classes"])) for i in range(start, stop)]
    order = np.random.default_rng([spec["seed"], 1, start, stop]).permutation(len(pairs))
    return {pairs[j]: f"{k:06d}.png" for k, j in enumerate(order)}


def _planned_files(spec: dict) -> dict[str, list[tuple[int, str, list]]]:
    """split -> [(class position, class id, [(image index, relative path), ...]), ...]."""
    plan = {}
    for split, (start, stop) in spec["splits"].items():
        names = None if spec["labeled"] else _unlabeled_names(spec, split)
        per_class = []
        for c, cls in enumerate(spec["classes"]):
            files = [(i, f"{split}/{cls['id']}/{i:05d}.png" if names is None else f"{split}/{names[(c, i)]}")
                     for i in range(start, stop)]
            per_class.append((c, cls["id"], files))
        plan[split] = per_class
    return plan


def _write_json(path: Path, data: dict) -> None:
    atomic_write_json(path, data, sort_keys=True, ensure_ascii=False)


def _read_json(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) and data.get("format") == FORMAT else None
    except (OSError, ValueError):
        return None


def _remove_splits(root: Path, spec: dict | None) -> None:
    """Delete the split folders a (possibly partial) earlier build of ours wrote."""
    for split in (spec or {}).get("splits", {}):
        shutil.rmtree(root / split, ignore_errors=True)


def _differences(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    changed = [k for k in keys if old.get(k) != new.get(k)]
    return ", ".join(changed) if changed else "none"


# ---------------------------------------------------------------------------------------------
# Rendering tasks (run in worker processes)

_RENDERERS: dict[tuple, GlyphRenderer] = {}


def _render_task(task) -> int:
    font_paths, params, seed, codepoint, font_keys, files = task
    key = (tuple(sorted(font_paths.items())), params)
    if key not in _RENDERERS:
        _RENDERERS.clear()
        _RENDERERS[key] = GlyphRenderer(font_paths, params)
    renderer = _RENDERERS[key]
    for folder in {os.path.dirname(path) for _, path in files}:
        os.makedirs(folder, exist_ok=True)
    suffix = f".{os.getpid()}.tmp"
    for index, path in files:
        pixels = renderer.render(seed, codepoint, index, font_keys)
        folder, name = os.path.split(path)
        tmp = os.path.join(folder, f".{name}{suffix}")
        Image.fromarray(pixels, mode="RGB").save(tmp, format="PNG")
        os.replace(tmp, path)
    return len(files)


def _render_all(root: Path, spec: dict, catalog: GlyphCatalog, params: RenderParams,
                num_workers: int | None, progress: bool) -> None:
    font_paths = {f.key: f.path for f in catalog.fonts}
    tasks = []
    for per_class in _planned_files(spec).values():
        for c, cid, files in per_class:
            todo = [(i, str(root / rel)) for i, rel in files if not (root / rel).exists()]
            if todo:
                cls = catalog.classes[cid]
                tasks.append((font_paths, params, spec["seed"], cls.codepoint, list(cls.fonts), todo))
    total = sum(len(t[-1]) for t in tasks)
    if not tasks:
        return
    workers = default_workers(num_workers)
    if num_workers is None and total < _PARALLEL_MIN_IMAGES:
        workers = 1
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"rendering glyphs into {root.name}", unit="img")
    try:
        for _ in map_in_processes(_render_task, tasks, workers, progress=bar.update if bar else None):
            pass
    finally:
        if bar is not None:
            bar.close()


def _remove_temporaries(root: Path, spec: dict) -> None:
    """Temporary files an interrupted build left (hidden, so no reader lists them; still litter)."""
    for split in spec["splits"]:
        for tmp in (root / split).rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def _count_files(root: Path, spec: dict) -> dict[str, int]:
    counts = {}
    for split in spec["splits"]:
        counts[split] = sum(1 for p in (root / split).rglob("*.png") if not p.name.startswith("."))
    return counts


def _software() -> dict:
    import fontTools
    import PIL
    from PIL import features

    return {"pillow": PIL.__version__, "freetype": features.version("freetype2"), "numpy": np.__version__,
            "fonttools": fontTools.version}


def _dataset(root: Path, manifest: dict) -> GlyphDataset:
    classes = manifest["classes"]
    return GlyphDataset(root=root, classes=[c["id"] for c in classes], chars=[c["char"] for c in classes],
                        scripts=[c["script"] for c in classes],
                        splits={name: str(root / name) for name in manifest["spec"]["splits"]},
                        num_images=dict(manifest["num_images"]), labeled=manifest["spec"]["labeled"],
                        manifest=manifest)


# ---------------------------------------------------------------------------------------------
# Public entry point


def glyph_dataset(root, classes=None, *, scripts=None, classes_per_script=None, class_seed: int = 0,
                  splits=None, seed: int = 0, image_size: int = 32, labeled: bool = True,
                  fonts="matplotlib", precomposed: bool = True, render: RenderParams | None = None,
                  overwrite: bool = False, num_workers: int | None = None, progress: bool = False) -> GlyphDataset:
    """Write (once) glyph images of the given classes under `root` and describe them.

    Args:
        root: the data set's folder (created; must be new, empty, or hold a
            glyph data set).
        classes: class ids ('U+0041', from `split_classes` or `script_classes`);
            or instead
        scripts, classes_per_script, class_seed: take `classes_per_script`
            classes (an int, a {script: int} dict, or None for all) of each
            script, the first part of `split_classes(script, ..., class_seed)`.
        splits: {split name: image count | range | (start, stop)} of image
            indices per class; counts follow each other from index 0. Default
            {"train": 40, "test": 20}.
        seed: the rendering seed: image i of class c is a pure function of
            (seed, c, i).
        image_size: side of the square RGB images (overrides `render.image_size`).
        labeled: one folder per class (True) or one flat folder per split with
            the class hidden (False, for proxy data).
        fonts, precomposed: see `rcfast.data.glyphs.load_catalog`.
        render: `RenderParams` (the variation); default `RenderParams()`.
        overwrite: replace a glyph data set with other parameters at `root`.
        num_workers: rendering processes; 0 or 1 renders in this process.
            Default: one per core, or this process for fewer than 2,000 images
            (starting workers costs more than it saves there).
        progress: show a tqdm progress bar.

    Returns a `GlyphDataset`. A second call with the same arguments reads the
    manifest and writes nothing.
    """
    for name, flag in (("labeled", labeled), ("precomposed", precomposed), ("overwrite", overwrite),
                       ("progress", progress)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    seed, class_seed = _check_seed("seed", seed), _check_seed("class_seed", class_seed)
    if render is not None and not isinstance(render, RenderParams):
        raise TypeError(f"render must be a RenderParams, got {render!r}")
    params = dataclasses.replace(render or RenderParams(), image_size=image_size)
    ranges = _split_ranges(DEFAULT_SPLITS if splits is None else splits)
    catalog = load_catalog(fonts, precomposed, default_workers(num_workers))
    chosen = _resolve_classes(catalog, classes, scripts, classes_per_script, class_seed, fonts, precomposed)

    spec = {
        "format": FORMAT, "version": VERSION, "seed": seed, "labeled": labeled, "precomposed": precomposed,
        "splits": {name: list(r) for name, r in ranges.items()},
        "render": params.as_dict(),
        "fonts": [{"key": f.key, "sha256": f.sha256} for f in catalog.fonts],
        "classes": [{"id": cid, "fonts": list(catalog.classes[cid].fonts)} for cid in chosen],
    }
    spec = json.loads(json.dumps(spec))  # the form it has once read back from disk

    root = Path(root).expanduser().resolve()
    manifest_path, marker_path = root / MANIFEST, root / MARKER
    if manifest_path.exists():
        stored = _read_json(manifest_path)
        if stored is None:
            raise ValueError(f"root {str(root)!r} holds a {MANIFEST} that is not a glyph data set's; "
                             "choose another folder")
        if stored.get("spec") == spec:
            return _dataset(root, stored)
        if not overwrite:
            raise ValueError(f"root {str(root)!r} already holds a glyph data set with other parameters "
                             f"(differing: {_differences(stored.get('spec', {}), spec)}); pass overwrite=True "
                             "to replace it, or choose another folder")
        # From here on the root reads as an interrupted build of the old
        # parameters, so a crash while replacing it leaves nothing half-valid.
        _write_json(marker_path, stored.get("spec", {}))
        manifest_path.unlink()
    if marker_path.exists():
        partial = _read_json(marker_path)
        if partial is None:
            raise ValueError(f"root {str(root)!r} holds a {MARKER} that is not a glyph build's; "
                             "choose another folder")
        if partial != spec:  # an interrupted build of other parameters: start again
            _remove_splits(root, partial)
    elif root.exists() and any(root.iterdir()):
        raise ValueError(f"root {str(root)!r} is not empty and holds no glyph data set; rcfast writes a "
                         "glyph data set only into a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    _write_json(marker_path, spec)

    _render_all(root, spec, catalog, params, num_workers, progress)
    _remove_temporaries(root, spec)

    expected = {name: len(chosen) * (stop - start) for name, (start, stop) in ranges.items()}
    found = _count_files(root, spec)
    if found != expected:
        raise RuntimeError(f"glyph data set at {str(root)!r} is incomplete after rendering: expected "
                           f"{expected} images, found {found}")
    manifest = {
        "format": FORMAT, "version": VERSION, "spec": spec, "num_images": expected,
        "images_per_class": {name: stop - start for name, (start, stop) in ranges.items()},
        "classes": [catalog.classes[cid].as_dict() for cid in chosen],
        "fonts": [{"key": f.key, "file": os.path.basename(f.path), "sha256": f.sha256} for f in catalog.fonts],
        "software": _software(),
    }
    _write_json(manifest_path, manifest)
    marker_path.unlink(missing_ok=True)
    return _dataset(root, manifest)
