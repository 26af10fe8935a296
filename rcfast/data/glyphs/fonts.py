"""Which font files the glyph data set renders with, and what identifies each one.

`resolve_fonts(fonts)` turns the user's choice into a list of `FontFile`s:

- `"matplotlib"` (the default): the TrueType fonts matplotlib ships in
  `mpl-data/fonts/ttf` -- DejaVu Sans / Serif / Mono with their bold and
  oblique styles, STIX, and the BaKoMa Computer Modern fonts (`cm*.ttf`).
  The same files on every machine with the same matplotlib, so a data set
  rendered from them is reproducible anywhere.
- `"noto"`: the Debian `fonts-noto-*` families when installed (regular, bold,
  italic and bold italic styles of `/usr/share/fonts/{truetype,opentype}/noto*`);
  nothing when they are not. Opt-in, because they make the data set depend on
  what the machine has installed.
- a list mixing those keywords and font file paths.

A file that FreeType (through Pillow) or fontTools cannot read is skipped
with a warning naming it. `LastResortHE` is left out: it maps every code point
to a placeholder box, which is exactly the "tofu" the data set must not hold.
Each font is identified by its file name plus the SHA-256 of its bytes, so a
cache or a manifest never confuses two different files of the same name.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

FONT_SUFFIXES = (".ttf", ".otf")
# Files that hold no real glyph of the characters their character map lists.
EXCLUDED_FONT_PREFIXES = ("LastResort",)
NOTO_DIRS = ("/usr/share/fonts/truetype/noto", "/usr/share/fonts/opentype/noto",
             "/usr/share/fonts/truetype/noto-extra", "/usr/share/fonts/opentype/noto-extra")
# Noto ships up to 18 weights/widths per family; these four styles are enough
# variation and keep the per-font catalogue work bounded.
NOTO_STYLES = ("-Regular", "-Bold", "-Italic", "-BoldItalic")
FONT_SETS = ("matplotlib", "noto")


@dataclass(frozen=True)
class FontFile:
    """One readable font file: `key` (unique short name), `path`, `sha256` of its bytes."""

    key: str
    path: str
    sha256: str


def matplotlib_font_dir() -> Path:
    import matplotlib  # only for where its data lives

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _matplotlib_fonts() -> list[Path]:
    folder = matplotlib_font_dir()
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in FONT_SUFFIXES)


def _noto_fonts() -> list[Path]:
    found = []
    for folder in NOTO_DIRS:
        if os.path.isdir(folder):
            for dirpath, _, names in os.walk(folder):
                found += [Path(dirpath) / n for n in names
                          if Path(n).suffix.lower() in FONT_SUFFIXES and Path(n).stem.endswith(NOTO_STYLES)]
    return sorted(found, key=lambda p: p.name)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=1024)
def _inspect(path: str, size: int, mtime_ns: int) -> tuple[str | None, str | None]:
    """(sha256, None) for a font FreeType and fontTools both read, else (None, why not).

    Keyed by size and modification time too, so a changed file is read again.
    """
    from fontTools.ttLib import TTFont
    from PIL import ImageFont

    try:
        ImageFont.truetype(path, 16, layout_engine=ImageFont.Layout.BASIC)
        cmap = TTFont(path, lazy=True, fontNumber=0).getBestCmap()
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a usable font"
        return None, f"{type(e).__name__}: {e}"
    if not cmap:
        return None, "it has no Unicode character map"
    return _sha256(Path(path)), None


def resolve_fonts(fonts="matplotlib") -> list[FontFile]:
    """The usable font files for `fonts` (see the module docstring), sorted by key.

    Raises TypeError/ValueError for a malformed `fonts`, FileNotFoundError for a
    listed path that does not exist, and ValueError when no usable font is left.
    """
    if isinstance(fonts, (str, os.PathLike)):
        fonts = [fonts]
    if not isinstance(fonts, (list, tuple)) or not fonts:
        raise TypeError(f"fonts must be 'matplotlib', 'noto', a font path, or a non-empty list of them, "
                        f"got {fonts!r}")
    candidates: list[Path] = []
    for item in fonts:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"fonts entries must be strings or paths, got {item!r}")
        if item == "matplotlib":
            candidates += _matplotlib_fonts()
        elif item == "noto":
            candidates += _noto_fonts()
        else:
            path = Path(item).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"fonts: {str(item)!r} is neither a font file nor one of {FONT_SETS}")
            candidates.append(path.resolve())

    chosen: dict[str, FontFile] = {}
    seen_hashes = set()
    for path in candidates:
        if path.name.startswith(EXCLUDED_FONT_PREFIXES):
            continue
        st = path.stat()
        sha, reason = _inspect(str(path), st.st_size, st.st_mtime_ns)
        if sha is None:
            warnings.warn(f"rcfast.data.glyphs: skipping font file {str(path)!r}: {reason}",
                          RuntimeWarning, stacklevel=3)
            continue
        if sha in seen_hashes:  # the same file twice (e.g. a system copy of a matplotlib font)
            continue
        seen_hashes.add(sha)
        key = path.stem if path.stem not in chosen else f"{path.stem}-{sha[:8]}"
        chosen[key] = FontFile(key=key, path=str(path), sha256=sha)
    if not chosen:
        raise ValueError(f"fonts={fonts!r}: no readable font file")
    return [chosen[k] for k in sorted(chosen)]
