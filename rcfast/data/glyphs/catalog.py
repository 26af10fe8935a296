"""The classes of the glyph data set: which characters, of which script, in which fonts.

A class is one Unicode character; its domain is its script. Both come from
Unicode data, not from a hand-made table:

- the script is the Unicode `Script` property (UAX #24), read from
  `fontTools.unicodedata.script` (fontTools bundles Scripts.txt; fontTools is
  a matplotlib dependency);
- a character is a class candidate when Python's `unicodedata` gives it a
  general category of a letter (Lu, Ll, Lt, Lo), a decimal digit (Nd) or an
  "other symbol" (So, e.g. Braille patterns), its script is a real one (not
  Common, Inherited or Unknown), and it has no *compatibility* decomposition
  (those are presentation variants of another character: Arabic positional
  forms, ligatures, fullwidth or mathematical letters). Modifier letters
  (Lm), combining marks and punctuation are left out. Letters with a
  *canonical* decomposition (é, ǻ, ἄ: a base letter with diacritics) are
  classes too, unless `precomposed=False`.

A font holds a class only when its glyph is real (checked once per font, at
a 64-pixel em, through the same FreeType path that renders the images):

- the character map lists the code point, and the glyph's name, read as an
  Adobe Glyph List name (`fontTools.agl`: 'A', 'afii10017', 'uni0410',
  'u1F600', 'a.sc'), is that character. The BaKoMa Computer Modern fonts
  claim a Unicode character map but map ASCII code points to TeX-encoded
  symbols -- cmsy10's 'a' is the glyph 'turnstileright', cmex10's 'A' is
  'parenrightbt' -- and are caught here; DejaVu and STIX name every glyph
  in the AGL way (fonts without glyph names get names derived from their
  character map, which pass);
- the rendering has ink (no blank image) and does not look like the font's
  `.notdef` glyph (no tofu box; "looks like" as for duplicates, below).

Identical renderings are *dropped*, not merged: two characters are
duplicates when some font holding both renders them alike -- placed by
their anchor as the images place them (see `render.Glyph`), at a 16-pixel em, no pixel differs by more than 64/255. Of a
pair, the lower code point keeps its class and the higher one is removed
from the catalogue, in every font. So Latin 'A' (U+0041) stays, Greek
'Alpha' (U+0391) and Cyrillic 'A' (U+0410), drawn with the same outline in
DejaVu, are dropped; Latin 'o', Greek omicron, Cyrillic 'o' and Armenian
'oh' keep only the Latin 'o'. Dropping keeps every remaining class a single
character of a single script. Pairs that differ by a dot or an accent (Arabic
tah and zah, Latin breve and caron) differ by far more than the threshold
and are both kept.

Per-font results are cached as JSON under `cache_dir()/glyphs/fonts`, keyed
by the font file's SHA-256 and the versions of this catalogue, Pillow,
FreeType, fontTools and Python's Unicode data.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import unicodedata
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ...extras import require
from ..sources import cache_dir
from .fonts import FontFile, resolve_fonts
from .pool import default_workers, map_in_processes
from .render import Glyph, glyph_bitmap, pil_font

CATALOG_VERSION = 4
CLASS_CATEGORIES = frozenset({"Lu", "Ll", "Lt", "Lo", "Nd", "So"})
NON_SCRIPTS = frozenset({"Zyyy", "Zinh", "Zzzz"})  # Common, Inherited, Unknown
REFERENCE_EM = 64          # pixels per em for the glyph checks
DUPLICATE_EM = 16          # pixels per em for the duplicate comparison
DUPLICATE_TOLERANCE = 64   # max per-pixel difference (of 255) of duplicates
_PARALLEL_MIN_FONT_BYTES = 2_000_000  # less font data is analysed faster than worker processes start
_CANVAS_EMS = 2            # the comparison canvas is 2 x 2 em, centred on the glyph's anchor


def class_id(codepoint: int) -> str:
    """The class name (folder name) of a code point: 'U+0041', 'U+10300'."""
    return f"U+{codepoint:04X}"


def is_candidate(codepoint: int) -> bool:
    """Whether a code point can be a class at all (see the module docstring)."""
    ch = chr(codepoint)
    if unicodedata.category(ch) not in CLASS_CATEGORIES:
        return False
    if unicodedata.decomposition(ch).startswith("<"):
        return False
    from fontTools import unicodedata as ucd

    return ucd.script(ch) not in NON_SCRIPTS


def script_of(codepoint: int) -> str:
    """The Unicode Script property's long name ('Latin', 'Canadian Aboriginal', ...)."""
    from fontTools import unicodedata as ucd

    return ucd.script_name(ucd.script(chr(codepoint)))


def is_precomposed(codepoint: int) -> bool:
    """A letter with a canonical decomposition (a base letter plus diacritics)."""
    decomposition = unicodedata.decomposition(chr(codepoint))
    return bool(decomposition) and not decomposition.startswith("<")


@dataclass(frozen=True)
class GlyphClass:
    """One class: a character, its script, and the fonts that really draw it."""

    id: str                 # "U+0041": the class folder's name
    codepoint: int
    char: str
    script: str
    name: str               # the Unicode character name
    fonts: tuple[str, ...]  # keys of the fonts holding a real glyph, sorted

    def as_dict(self) -> dict:
        return {"id": self.id, "codepoint": self.codepoint, "char": self.char, "script": self.script,
                "name": self.name, "fonts": list(self.fonts)}


@dataclass
class GlyphCatalog:
    """The classes a set of fonts can render, by script.

    `classes` maps class id to `GlyphClass`, in code point order; `dropped`
    maps each dropped duplicate's id to the id of the kept class it renders
    like; `rejected[font_key]` counts the code points a font's character map
    lists but that were refused (`misnamed`, `blank`, `notdef`).
    """

    fonts: list[FontFile]
    precomposed: bool
    classes: dict[str, GlyphClass]
    dropped: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, dict[str, int]] = field(default_factory=dict)

    def scripts(self) -> dict[str, list[str]]:
        """Script name -> its class ids (code point order), most classes first."""
        by_script: dict[str, list[str]] = {}
        for cls in self.classes.values():
            by_script.setdefault(cls.script, []).append(cls.id)
        return dict(sorted(by_script.items(), key=lambda kv: (-len(kv[1]), kv[0])))

    def counts(self) -> dict[str, int]:
        return {name: len(ids) for name, ids in self.scripts().items()}


# ---------------------------------------------------------------------------------------------
# Per-font analysis (runs in worker processes; results cached on disk)


def _comparison_image(glyph: Glyph) -> np.ndarray:
    """A glyph placed by its anchor in a 2 x 2 em canvas, box-averaged to a 16-pixel em (int16)."""
    side = _CANVAS_EMS * REFERENCE_EM
    canvas = np.zeros((side, side), np.uint8)
    h, w = glyph.bitmap.shape
    x0, y0 = (int(round(side / 2 + v)) for v in glyph.offset)
    # Parts of a glyph beyond one em from its anchor are left out of the comparison.
    top, left = max(0, y0), max(0, x0)
    bottom, right = min(side, y0 + h), min(side, x0 + w)
    if bottom > top and right > left:
        canvas[top:bottom, left:right] = glyph.bitmap[top - y0:bottom - y0, left - x0:right - x0]
    return np.asarray(Image.fromarray(canvas).reduce(REFERENCE_EM // DUPLICATE_EM), dtype=np.int16)


def _max_pool(images: np.ndarray, k: int) -> np.ndarray:
    n, side, _ = images.shape
    return images.reshape(n, side // k, k, side // k, k).max(axis=(2, 4)).reshape(n, -1)


def _within_tolerance(values: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Which rows (i, j) of `pairs` have max |values[i] - values[j]| <= the tolerance (in chunks)."""
    keep = np.zeros(len(pairs), bool)
    for start in range(0, len(pairs), 16384):
        i, j = pairs[start:start + 16384].T
        keep[start:start + 16384] = np.abs(values[i] - values[j]).max(axis=1) <= DUPLICATE_TOLERANCE
    return keep


def _near_duplicate_pairs(images: np.ndarray, codepoints: list[int]) -> list[tuple[int, int]]:
    """Pairs (lower, higher code point) whose comparison images differ by <= the tolerance everywhere.

    All pairs of a font's ~3,000 glyphs are pruned in stages that can only
    drop pairs beyond the tolerance: if no pixel differs by more than t, no
    maximum over a 4 x 4 block does (the max is 1-Lipschitz in the max-norm),
    so a block nearly empty (< 64) in one glyph and inked (> 191) in the other
    rules a pair out -- checked for all pairs at once on 64-bit masks. The
    survivors are compared on 4 x 4 and 2 x 2 block maxima, then pixel by pixel.
    """
    n = len(codepoints)
    if n < 2:
        return []
    pooled = _max_pool(images, 4)  # [n, 64]: one bit per block in a uint64

    def bits(flags):
        return np.packbits(flags, axis=1, bitorder="little").view(np.uint64)[:, 0]

    low, high = bits(pooled < DUPLICATE_TOLERANCE), bits(pooled > 255 - DUPLICATE_TOLERANCE)
    candidates = []
    for start in range(0, n, 256):
        clash = (low[start:start + 256, None] & high[None, :]) | (high[start:start + 256, None] & low[None, :])
        i, j = np.nonzero(clash == 0)
        i = i + start
        candidates.append(np.stack([i[i < j], j[i < j]], axis=1))
    pairs = np.concatenate(candidates)
    for values in (pooled, _max_pool(images, 2), images.reshape(n, -1)):
        pairs = pairs[_within_tolerance(values, pairs)]
    cps = np.asarray(codepoints)
    return sorted((int(cps[i]), int(cps[j])) for i, j in pairs)  # codepoints are ascending: cps[i] < cps[j]


def _notdef_codepoint(cmap: dict) -> int:
    """A code point the font does not map, so FreeType draws glyph 0 (.notdef) for it."""
    cp = 0x10FFFD  # private use, plane 16
    while cp in cmap:
        cp -= 1
    return cp


def analyse_font(font: FontFile) -> dict:
    """Which candidate code points `font` really draws, and its near-duplicate pairs."""
    from fontTools import agl
    from fontTools.ttLib import TTFont

    cmap = TTFont(font.path, lazy=True, fontNumber=0).getBestCmap()
    pil = pil_font(font.path, REFERENCE_EM)
    notdef_glyph = glyph_bitmap(pil, chr(_notdef_codepoint(cmap)))
    notdef = None if notdef_glyph is None else _comparison_image(notdef_glyph)
    valid, images = [], []
    rejected = {"misnamed": 0, "blank": 0, "notdef": 0}
    for cp, glyph_name in sorted(cmap.items()):
        if not is_candidate(cp):
            continue
        if agl.toUnicode(glyph_name) != chr(cp):
            rejected["misnamed"] += 1
            continue
        glyph = glyph_bitmap(pil, chr(cp))
        if glyph is None:
            rejected["blank"] += 1
            continue
        image = _comparison_image(glyph)
        # Compared like duplicates, not for equality: FreeType's auto-hinter
        # treats glyph 0 (reached by no character) apart, so an exact copy of
        # the .notdef box, mapped to a letter, rasterises a little differently.
        if notdef is not None and np.abs(image - notdef).max() <= DUPLICATE_TOLERANCE:
            rejected["notdef"] += 1
            continue
        valid.append(cp)
        images.append(image)
    pairs = _near_duplicate_pairs(np.stack(images), valid) if images else []
    return {"valid": valid, "duplicates": [list(p) for p in pairs], "rejected": rejected}


# ---------------------------------------------------------------------------------------------
# Cache and assembly


def _software_key() -> str:
    import fontTools
    import PIL
    from PIL import features

    parts = [f"catalog{CATALOG_VERSION}", f"pillow{PIL.__version__}", f"freetype{features.version('freetype2')}",
             f"fonttools{fontTools.version}", f"unicode{unicodedata.unidata_version}",
             f"{REFERENCE_EM}-{DUPLICATE_EM}-{DUPLICATE_TOLERANCE}"]
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]


def _cache_path(font: FontFile) -> str:
    return os.path.join(cache_dir(), "glyphs", "fonts", f"{font.sha256[:24]}-{_software_key()}.json")


def _load_cached(font: FontFile) -> dict | None:
    try:
        with open(_cache_path(font), encoding="utf-8") as f:
            data = json.load(f)
        if data.get("sha256") == font.sha256:
            return data["analysis"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache yet, or an unreadable one: the font is analysed again
    return None


def _store(font: FontFile, analysis: dict) -> None:
    path = _cache_path(font)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".font-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"sha256": font.sha256, "file": os.path.basename(font.path), "analysis": analysis}, f)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"rcfast.data.glyphs: could not write the font cache {path!r} ({e}); "
                      "the font will be analysed again next time", RuntimeWarning, stacklevel=3)


def _analyses(fonts: list[FontFile], num_workers: int) -> dict[str, dict]:
    result = {f.key: _load_cached(f) for f in fonts}
    todo = [f for f in fonts if result[f.key] is None]
    if todo:
        if sum(os.path.getsize(f.path) for f in todo) < _PARALLEL_MIN_FONT_BYTES:
            num_workers = 1
        for font, analysis in zip(todo, map_in_processes(analyse_font, todo, num_workers)):
            result[font.key] = analysis
            _store(font, analysis)
    return result


def assemble(fonts: list[FontFile], analyses: dict[str, dict], precomposed: bool) -> GlyphCatalog:
    """The catalogue from per-font analyses: candidates, then duplicates dropped (lower code point kept)."""
    holders: dict[int, list[str]] = {}
    for font in fonts:
        for cp in analyses[font.key]["valid"]:
            holders.setdefault(cp, []).append(font.key)
    if not precomposed:
        holders = {cp: keys for cp, keys in holders.items() if not is_precomposed(cp)}
    lower_twins: dict[int, set[int]] = {}
    for font in fonts:
        for low, high in analyses[font.key]["duplicates"]:
            if low in holders and high in holders:
                lower_twins.setdefault(high, set()).add(low)
    kept: dict[str, GlyphClass] = {}
    dropped: dict[str, str] = {}
    for cp in sorted(holders):
        twin = min((t for t in lower_twins.get(cp, ()) if class_id(t) in kept), default=None)
        if twin is not None:
            dropped[class_id(cp)] = class_id(twin)
            continue
        kept[class_id(cp)] = GlyphClass(id=class_id(cp), codepoint=cp, char=chr(cp), script=script_of(cp),
                                        name=unicodedata.name(chr(cp), class_id(cp)),
                                        fonts=tuple(sorted(holders[cp])))
    rejected = {font.key: dict(analyses[font.key]["rejected"]) for font in fonts}
    return GlyphCatalog(fonts=list(fonts), precomposed=precomposed, classes=kept, dropped=dropped,
                        rejected=rejected)


_MEMO: dict[tuple, GlyphCatalog] = {}


def load_catalog(fonts="matplotlib", precomposed: bool = True, num_workers: int | None = None) -> GlyphCatalog:
    """The catalogue of `fonts` (see `resolve_fonts`), analysing uncached fonts in parallel.

    The first call for a font set renders every candidate glyph of every font
    once (seconds per font; in `num_workers` processes, default one per core)
    and caches the result on disk; later calls read the cache.
    """
    if not isinstance(precomposed, bool):
        raise TypeError(f"precomposed must be True or False, got {precomposed!r}")
    # matplotlib ships the fonts (and brings fontTools); scikit-learn the photographs.
    require("rcfast.data.glyphs", "matplotlib", "fontTools", "sklearn")
    resolved = resolve_fonts(fonts)
    memo_key = (tuple(f.sha256 for f in resolved), tuple(f.key for f in resolved), precomposed,
                _software_key(), str(cache_dir()))
    if memo_key not in _MEMO:
        analyses = _analyses(resolved, default_workers(num_workers))
        _MEMO[memo_key] = assemble(resolved, analyses, precomposed)
    return _MEMO[memo_key]
