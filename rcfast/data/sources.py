"""Image sources: listing, labels, and the check that finds unreadable files once.

A source is a folder (searched recursively; with labels, its first-level
sub-folders are the classes, in sorted order) or a text file listing image
paths, one per line, optionally followed by an integer label
(`path/to/img.jpg 3`; relative paths are resolved against the list file's
folder; blank lines and lines starting with `#` are ignored).

Every candidate file is checked once: `PIL.Image.verify()` (structure) plus a
decode (at 1/8 scale for JPEG, which still reads every entropy-coded byte, so
truncation shows) in a thread pool. The result, with each readable image's size
and format, is cached in a small JSON index keyed by path + size + mtime, under
`$RCFAST_CACHE_DIR` (default `~/.cache/rcfast`), so later runs re-check only new
or changed files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

# Extensions picked up when listing a folder (other files, e.g. a README, are
# not images and are ignored). GIF is left out: DALI cannot decode it.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm", ".pnm"})
# PIL format names that DALI's image decoders read.
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"})

_INDEX_VERSION = 1
_EXIF_ORIENTATION = 0x0112


def cache_dir() -> Path:
    """Where rcfast keeps its caches: `$RCFAST_CACHE_DIR` or `~/.cache/rcfast`."""
    env = os.environ.get("RCFAST_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "rcfast"


@dataclass
class ImageSet:
    """The readable images of a source, in a fixed (sorted) order.

    `paths[i]`, `labels[i]` (or None), `widths[i]`, `heights[i]` (after EXIF
    rotation) and `formats[i]` describe image i; `skipped` lists the
    `(path, reason)` of candidates that are not readable images.
    """

    source: Path
    paths: list[str]
    labels: list[int] | None
    widths: list[int]
    heights: list[int]
    formats: list[str]
    classes: list[str] | None
    skipped: list[tuple[str, str]] = field(default_factory=list)


def list_candidates(source: str | os.PathLike, labels: bool):
    """Candidate files of a source: `(paths, labels or None, classes or None)`."""
    src = Path(source).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"source {str(source)!r} does not exist")
    src = src.resolve()
    if src.is_dir():
        return _list_folder(src, labels)
    return _list_file(src, labels)


def _list_folder(root: Path, labels: bool):
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(os.path.join(dirpath, name))
    # Sorted by relative path: the same order on every machine and every rank.
    found.sort(key=lambda p: Path(p).relative_to(root).as_posix())
    if not labels:
        return found, None, None
    rel_parts = [Path(p).relative_to(root).parts for p in found]
    loose = [p for p, parts in zip(found, rel_parts) if len(parts) < 2]
    if loose:
        raise ValueError(
            f"labels=True needs class sub-folders under source {str(root)!r}, but "
            f"{len(loose)} image(s) lie directly in it, e.g. {loose[0]!r}")
    classes = sorted({parts[0] for parts in rel_parts})
    class_index = {name: i for i, name in enumerate(classes)}
    return found, [class_index[parts[0]] for parts in rel_parts], classes


def _list_file(list_path: Path, labels: bool):
    base = list_path.parent
    paths, found_labels = [], []
    with open(list_path, encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            path, label = line, None
            parts = line.rsplit(None, 1)
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                path, label = parts[0], int(parts[1])
            if labels and label is None:
                raise ValueError(
                    f"labels=True but line {line_no} of source list {str(list_path)!r} has no "
                    f"integer label: {line!r} (expected 'path label')")
            p = Path(path).expanduser()
            paths.append(str(p if p.is_absolute() else (base / p)))
            found_labels.append(label)
    if not labels:
        return paths, None, None
    if any(lbl < 0 for lbl in found_labels):
        raise ValueError(f"labels in source list {str(list_path)!r} must be >= 0")
    return paths, found_labels, None


def _inspect(path: str):
    """(width, height, format) of a readable image, or raise."""
    if os.path.getsize(path) == 0:
        raise OSError("empty file")
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        width, height = im.size
        fmt = im.format or "unknown"
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1) if fmt in ("JPEG", "MPO", "TIFF", "WEBP", "PNG") else 1
        if fmt in ("JPEG", "MPO"):
            # Decode at 1/8 scale: every entropy-coded byte is still read, so a
            # truncated file fails here, at a fraction of a full decode's cost.
            im.draft("RGB", (max(1, width // 8), max(1, height // 8)))
        im.load()
    if orientation in (5, 6, 7, 8):  # EXIF rotations by 90 degrees swap the sides
        width, height = height, width
    if width <= 0 or height <= 0:
        raise OSError("image has no pixels")
    return width, height, fmt


def _check(path: str):
    try:
        st = os.stat(path)
    except OSError as e:
        return path, None, f"{type(e).__name__}: {e}"
    key = [st.st_size, st.st_mtime_ns]
    try:
        width, height, fmt = _inspect(path)
    except Exception as e:  # noqa: BLE001 - any failure means "not a readable image"
        return path, key + [None, None, None, f"{type(e).__name__}: {e}"], None
    return path, key + [width, height, fmt, None], None


def _index_path(source: Path) -> Path:
    digest = hashlib.sha256(str(source).encode()).hexdigest()[:24]
    return cache_dir() / "image_index" / f"{digest}.json"


def _load_index(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("version") == _INDEX_VERSION:
            return data["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache yet, or an unreadable one: everything is checked again
    return {}


def _save_index(path: Path, source: Path, entries: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename, so DDP ranks writing the same index never leave a
        # half-written file behind.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".index-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": _INDEX_VERSION, "source": str(source), "entries": entries}, f)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"rcfast.data: could not write the image-check cache {str(path)!r} ({e}); "
                      "images will be checked again on the next run", RuntimeWarning, stacklevel=3)


def scan(source: str | os.PathLike, labels: bool, num_threads: int = 2) -> ImageSet:
    """List a source and keep its readable images (see the module docstring).

    Candidates that are not readable images are returned in `skipped` (the
    caller warns about them once); raises FileNotFoundError for a missing
    source and ValueError when no readable image is left.
    """
    paths, path_labels, classes = list_candidates(source, labels)
    src = Path(source).expanduser().resolve()
    index_file = _index_path(src)
    cached = _load_index(index_file)

    results: dict[str, list | None] = {}
    missing: dict[str, str] = {}
    to_check = []
    for p in paths:
        entry = cached.get(p)
        try:
            st = os.stat(p)
        except OSError as e:
            missing[p] = f"{type(e).__name__}: {e}"
            continue
        if entry is not None and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            results[p] = entry
        else:
            to_check.append(p)
    if to_check:
        # PIL releases the GIL while decoding, so threads check in parallel.
        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            for p, entry, error in pool.map(_check, to_check):
                if entry is None:
                    missing[p] = error
                else:
                    results[p] = entry
        # Only this source's current files are kept: the index cannot grow stale.
        _save_index(index_file, src, results)

    keep_paths, keep_labels, widths, heights, formats, skipped = [], [], [], [], [], []
    for i, p in enumerate(paths):
        entry = results.get(p)
        if entry is None:
            skipped.append((p, missing.get(p, "unreadable")))
        elif entry[5] is not None:
            skipped.append((p, entry[5]))
        else:
            keep_paths.append(p)
            widths.append(entry[2])
            heights.append(entry[3])
            formats.append(entry[4])
            if path_labels is not None:
                keep_labels.append(path_labels[i])
    if not keep_paths:
        detail = f" ({len(skipped)} unreadable file(s), e.g. {skipped[0][0]!r}: {skipped[0][1]})" if skipped else ""
        raise ValueError(f"source {str(source)!r} contains no readable image{detail}")
    return ImageSet(source=src, paths=keep_paths, labels=keep_labels if path_labels is not None else None,
                    widths=widths, heights=heights, formats=formats, classes=classes, skipped=skipped)


def skipped_warning(image_set: ImageSet, shown: int = 5) -> str:
    """The one warning text listing a source's unreadable files."""
    skipped = image_set.skipped
    total = len(skipped) + len(image_set.paths)
    listed = "; ".join(f"{p} ({reason})" for p, reason in skipped[:shown])
    more = f"; and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return (f"rcfast.data: skipping {len(skipped)} of {total} files in {str(image_set.source)!r} "
            f"that are not readable images: {listed}{more}")
