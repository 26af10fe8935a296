"""Image sources: listing, labels, and the check that finds unusable files once.

A source is a folder (searched recursively; with labels, its first-level
sub-folders are the classes, in sorted order) or a text file listing image
paths, one per line, optionally followed by an integer label
(`path/to/img.jpg 3`; relative paths are resolved against the list file's
folder; blank lines and lines starting with `#` are ignored; a listed path
that does not exist is an error).

Folders are walked with symbolic links followed, but every real directory is
listed once, identified by (device, inode): a link to a directory already
listed (a loop such as `self -> .` or `up -> ..`, or a second path to the same
folder) is not followed again and is named in the scan result, so no image is
counted twice and the walk always ends. Real sub-folders win over links to
them; the listing is sorted by path, the same on every machine and rank.

Every candidate file is checked once, in a thread pool, before any training:

1. its header size against the pixel limit (`max_pixels`), *before* any pixel
   is decoded: a small file that expands to a huge image (a decompression
   bomb) is skipped, never decoded, by either backend;
2. `PIL.Image.verify()` (structure, PNG chunk CRCs);
3. a decode: JPEGs with libjpeg-turbo through `simplejpeg` at 1/8 scale (every
   entropy-coded byte is still read, so truncation shows), recording the
   warnings libjpeg raises for damaged entropy-coded data ("Corrupt JPEG data:
   premature end of data segment", ...), which PIL and DALI would otherwise
   decode silently into garbage; other formats with a full PIL decode.

The result, with each image's size, format and decoder warning, is cached in
a small JSON index keyed by path + size + mtime, under `$RCFAST_CACHE_DIR`
(default `~/.cache/rcfast`), so later runs re-check only new or changed files.
The pixel limit and the damaged-JPEG policy are applied to the cached facts at
scan time, so changing either needs no re-check.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
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
# PIL's own default limit (Image.MAX_IMAGE_PIXELS as shipped): about 89.5
# megapixels, e.g. 10,000 x 8,900; a 224-pixel training crop needs far fewer.
DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3

_INDEX_VERSION = 2
_EXIF_ORIENTATION = 0x0112
_JPEG_FORMATS = ("JPEG", "MPO")


def cache_dir() -> Path:
    """Where rcfast keeps its caches: `$RCFAST_CACHE_DIR` or `~/.cache/rcfast`."""
    env = os.environ.get("RCFAST_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "rcfast"


@dataclass
class ImageSet:
    """The usable images of a source, in a fixed (sorted) order.

    `paths[i]`, `labels[i]` (or None), `widths[i]`, `heights[i]` (after EXIF
    rotation) and `formats[i]` describe image i; `skipped` lists the
    `(path, reason)` of candidates that are unreadable, damaged or over the
    pixel limit; `links_not_followed` the `(link, target)` of symbolic links to
    directories that were already listed (loops, second paths).
    """

    source: Path
    paths: list[str]
    labels: list[int] | None
    widths: list[int]
    heights: list[int]
    formats: list[str]
    classes: list[str] | None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    links_not_followed: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Candidates:
    """A source's candidate files, before any is opened."""

    paths: list[str]
    labels: list[int] | None
    classes: list[str] | None
    links_not_followed: list[tuple[str, str]]


def list_candidates(source: str | os.PathLike, labels: bool) -> Candidates:
    """Candidate files of a source (a folder or a list file); raises for a bad source."""
    src = Path(source).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"source {str(source)!r} does not exist")
    src = src.resolve()
    if src.is_dir():
        return _list_folder(src, labels)
    if not stat.S_ISREG(src.stat().st_mode):
        raise ValueError(f"source {str(source)!r} is neither a folder nor a regular file (a list of image paths)")
    return _list_file(src, labels)


def _dir_key(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _walk(top: str, seen: set, ancestors: set, found: list, not_followed: list) -> None:
    """Image files under `top`, each real directory once (see the module docstring).

    Real sub-directories are walked first (os.walk without following links);
    links to directories are followed afterwards, in sorted order, when their
    target has not been listed yet and does not contain the source (a link to
    an ancestor is a loop).
    """
    links = []
    for dirpath, dirnames, filenames in os.walk(top):
        keep = []
        for name in sorted(dirnames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                links.append(full)
                continue
            key = _dir_key(full)
            if key not in seen:  # a bind mount can show a directory twice
                seen.add(key)
                keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(os.path.join(dirpath, name))
    for link in links:
        try:
            key = _dir_key(link)
        except OSError:  # a dangling link: nothing to list
            continue
        if key in seen or key in ancestors:
            not_followed.append((link, os.readlink(link)))
            continue
        seen.add(key)
        _walk(link, seen, ancestors, found, not_followed)


def _list_folder(root: Path, labels: bool) -> Candidates:
    ancestors = {_dir_key(parent) for parent in root.parents}
    found: list[str] = []
    not_followed: list[tuple[str, str]] = []
    _walk(str(root), {_dir_key(root)}, ancestors, found, not_followed)
    # Sorted by relative path: the same order on every machine and every rank.
    found.sort(key=lambda p: Path(p).relative_to(root).as_posix())
    not_followed.sort()
    if not labels:
        return Candidates(found, None, None, not_followed)
    rel_parts = [Path(p).relative_to(root).parts for p in found]
    loose = [p for p, parts in zip(found, rel_parts) if len(parts) < 2]
    if loose:
        raise ValueError(
            f"labels=True needs class sub-folders under source {str(root)!r}, but "
            f"{len(loose)} image(s) lie directly in it, e.g. {loose[0]!r}")
    classes = sorted({parts[0] for parts in rel_parts})
    class_index = {name: i for i, name in enumerate(classes)}
    return Candidates(found, [class_index[parts[0]] for parts in rel_parts], classes, not_followed)


def _list_file(list_path: Path, labels: bool, shown: int = 5) -> Candidates:
    base = list_path.parent
    paths, found_labels = [], []
    try:
        with open(list_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"source {str(list_path)!r} is a file but not a UTF-8 text list of image paths "
                         f"({e.reason} at byte {e.start}); to use a single folder of images, pass the "
                         "folder") from None
    for line_no, raw in enumerate(lines, start=1):
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
    missing = [p for p in paths if not os.path.lexists(p)]
    if missing:
        listed = ", ".join(repr(p) for p in missing[:shown])
        more = f" and {len(missing) - shown} more" if len(missing) > shown else ""
        raise ValueError(
            f"source list {str(list_path)!r} names {len(missing)} path(s) that do not exist: {listed}{more} "
            f"(relative paths are resolved against the list's folder {str(base)!r})")
    if not labels:
        return Candidates(paths, None, None, [])
    if any(lbl < 0 for lbl in found_labels):
        raise ValueError(f"labels in source list {str(list_path)!r} must be >= 0")
    return Candidates(paths, found_labels, None, [])


class _OverPixelLimit(Exception):
    """Raised by `_inspect` when the header alone shows more pixels than allowed."""


def _orientation(im: Image.Image) -> int:
    fmt = im.format or ""
    return im.getexif().get(_EXIF_ORIENTATION, 1) if fmt in ("JPEG", "MPO", "TIFF", "WEBP", "PNG") else 1


def require_simplejpeg() -> None:
    """Raise a clear error, before any file is checked, when the JPEG checker (simplejpeg) is missing."""
    from rcfast.extras import require
    require("rcfast.data's image check (JPEGs are checked with libjpeg-turbo)", "simplejpeg")


def _jpeg_warning(path: str) -> str | None:
    """Decode a JPEG at 1/8 scale with libjpeg-turbo; its first warning, or None.

    Raises ValueError when the data cannot be decoded at all. libjpeg warns
    (and decodes garbage) on damaged entropy-coded data; PIL and DALI both
    ignore those warnings, so they are looked for here.
    """
    import simplejpeg  # the [data] extra; scan() checks for it up front

    with open(path, "rb") as f:
        data = f.read()
    colorspace = simplejpeg.decode_jpeg_header(data)[2]
    # Grey output skips colour conversion but still decodes every component's
    # coefficients; CMYK sources must stay CMYK (libjpeg has no CMYK -> grey).
    target = "CMYK" if colorspace in ("CMYK", "YCCK") else "GRAY"
    try:
        simplejpeg.decode_jpeg(data, colorspace=target, min_height=1, min_width=1, strict=True)
        return None
    except ValueError as strict_error:
        if "Premature end of JPEG file" in str(strict_error):
            # Truncated: unreadable, as PIL ("image file is truncated") has it.
            raise OSError(str(strict_error)) from None
        # Decodable despite the warning? Then it is damage, not unreadability.
        simplejpeg.decode_jpeg(data, colorspace=target, min_height=1, min_width=1, strict=False)
        return str(strict_error)


def _inspect(path: str, max_pixels: int):
    """(width, height, format, decoder warning, decoded) of an image file, or raise.

    Files whose header shows more than `max_pixels` pixels are not decoded
    (`decoded` is False); a later scan with a larger limit checks them again.
    """
    if os.path.getsize(path) == 0:
        raise OSError("empty file")
    with Image.open(path) as im:  # reads the header only
        width, height = im.size
        fmt = im.format or "unknown"
        if width <= 0 or height <= 0:
            raise OSError("image has no pixels")
        if width * height > max_pixels:
            return width, height, fmt, None, False
        im.verify()
    warning = None
    with Image.open(path) as im:
        if fmt not in _JPEG_FORMATS:
            # Loaded first: PIL applies a TIFF's orientation tag itself on load
            # (size and pixels; the tag is then gone), and reads a PNG's eXIf
            # chunk even when it follows the image data.
            im.load()
        width, height = im.size
        orientation = _orientation(im)
    if fmt in _JPEG_FORMATS:
        warning = _jpeg_warning(path)
    if orientation in (5, 6, 7, 8):  # EXIF rotations by 90 degrees swap the sides
        width, height = height, width
    return width, height, fmt, warning, True


def _check(path: str, max_pixels: int):
    """(path, index entry or None, stat error or None) for one candidate file.

    An entry is [size, mtime_ns, width, height, format, error, warning, decoded].
    """
    try:
        st = os.stat(path)
    except OSError as e:
        return path, None, f"{type(e).__name__}: {e}"
    key = [st.st_size, st.st_mtime_ns]
    try:
        width, height, fmt, warning, decoded = _inspect(path, max_pixels)
    except Exception as e:  # noqa: BLE001 - any failure means "not a readable image"
        return path, key + [None, None, None, f"{type(e).__name__}: {e}", None, False], None
    return path, key + [width, height, fmt, None, warning, decoded], None


def _verdict(entry: list, max_pixels: int, skip_damaged_jpegs: bool) -> str | None:
    """Why a checked file is skipped under these settings, or None to keep it."""
    _, _, width, height, _, error, warning, _ = entry
    if error is not None:
        return error
    if width * height > max_pixels:
        return (f"{width * height} pixels ({width} x {height}) > max_pixels={max_pixels}: "
                "not decoded (decompression-bomb limit)")
    if warning is not None and skip_damaged_jpegs:
        return f"damaged JPEG data: {warning}"
    return None


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


def _reusable(entry, st, max_pixels: int) -> bool:
    """A cached entry still describes the file and was checked far enough for this limit."""
    if entry is None or len(entry) != 8 or entry[0] != st.st_size or entry[1] != st.st_mtime_ns:
        return False
    width, height, decoded = entry[2], entry[3], entry[7]
    return decoded or (width is not None and width * height > max_pixels) or entry[5] is not None


def scan(source: str | os.PathLike, labels: bool, num_threads: int = 2,
         max_pixels: int = DEFAULT_MAX_PIXELS, skip_damaged_jpegs: bool = True) -> ImageSet:
    """List a source and keep its usable images (see the module docstring).

    Candidates that are unreadable, damaged (JPEG decoder warnings, when
    `skip_damaged_jpegs`) or larger than `max_pixels` are returned in
    `skipped` with the reason (the caller warns about them once); raises
    FileNotFoundError for a missing source and ValueError when no usable image
    is left.
    """
    found = list_candidates(source, labels)
    paths, path_labels = found.paths, found.labels
    src = Path(source).expanduser().resolve()
    index_file = _index_path(src)
    cached = _load_index(index_file)

    results: dict[str, list] = {}
    missing: dict[str, str] = {}
    to_check = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as e:
            missing[p] = f"{type(e).__name__}: {e}"
            continue
        entry = cached.get(p)
        if _reusable(entry, st, max_pixels):
            results[p] = entry
        else:
            to_check.append(p)
    if to_check:
        require_simplejpeg()
        # PIL and libjpeg release the GIL while decoding: threads check in parallel.
        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            for p, entry, error in pool.map(_check, to_check, [max_pixels] * len(to_check)):
                if entry is None:
                    missing[p] = error
                else:
                    results[p] = entry
        # Only this source's current files are kept: the index cannot grow stale.
        # PIL's own bomb error depends on a global PIL setting: not cached.
        _save_index(index_file, src, {p: e for p, e in results.items()
                                      if not (e[5] or "").startswith("DecompressionBombError")})

    keep_paths, keep_labels, widths, heights, formats, skipped = [], [], [], [], [], []
    for i, p in enumerate(paths):
        entry = results.get(p)
        reason = missing.get(p, "unreadable") if entry is None else _verdict(entry, max_pixels,
                                                                           skip_damaged_jpegs)
        if reason is not None:
            skipped.append((p, reason))
            continue
        keep_paths.append(p)
        widths.append(entry[2])
        heights.append(entry[3])
        formats.append(entry[4])
        if path_labels is not None:
            keep_labels.append(path_labels[i])
    if not keep_paths:
        detail = f" ({len(skipped)} unusable file(s), e.g. {skipped[0][0]!r}: {skipped[0][1]})" if skipped else ""
        raise ValueError(f"source {str(source)!r} contains no readable image{detail}")
    return ImageSet(source=src, paths=keep_paths, labels=keep_labels if path_labels is not None else None,
                    widths=widths, heights=heights, formats=formats, classes=found.classes,
                    skipped=skipped, links_not_followed=found.links_not_followed)


def skipped_warning(image_set: ImageSet, shown: int = 5) -> str:
    """The one warning text listing a source's skipped files and why."""
    skipped = image_set.skipped
    total = len(skipped) + len(image_set.paths)
    listed = "; ".join(f"{p} ({reason})" for p, reason in skipped[:shown])
    more = f"; and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return (f"rcfast.data: skipping {len(skipped)} of {total} files in {str(image_set.source)!r} "
            f"that are not readable images (unreadable, damaged, or over the pixel limit): {listed}{more}")


def links_warning(image_set: ImageSet, shown: int = 5) -> str:
    """The one warning text naming the directory links that were not followed."""
    links = image_set.links_not_followed
    listed = "; ".join(f"{link} -> {target}" for link, target in links[:shown])
    more = f"; and {len(links) - shown} more" if len(links) > shown else ""
    return (f"rcfast.data: not following {len(links)} symbolic link(s) in {str(image_set.source)!r} to "
            f"folders already listed (a loop, or a second path to the same folder): {listed}{more}")
