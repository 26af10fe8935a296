"""Glyph images rendered from real fonts: Unicode characters as classes, scripts as domains.

Built for the transfer benchmark (issue 10) and the OT / IE-KD / DMC
evidence: no download, every image a pure function of (seed, class, image
index), written as class folders that `ProxyImages` reads like any user data.

    from rcfast.data.glyphs import available_scripts, split_classes, glyph_dataset

    available_scripts()                      # {'Latin': 902, 'Canadian Aboriginal': 392, ...}
    train, future = split_classes("Georgian", [60, 40], seed=0)
    ds = glyph_dataset("data/georgian", train, splits={"train": 40, "test": 20}, seed=0)
    ds.splits["train"], ds.classes           # a folder per class; label i is ds.classes[i]

Modules: `fonts` (which font files), `catalog` (which characters each font
really draws, by script; duplicates dropped), `classes` (choosing disjoint
class subsets), `render` (one image), `dataset` (the folder tree and
manifest), `sheet` (a contact sheet). See docs/glyphs.md.
"""

from .catalog import GlyphCatalog, GlyphClass, load_catalog
from .classes import available_scripts, script_classes, split_classes
from .dataset import GlyphDataset, glyph_dataset
from .fonts import resolve_fonts
from .render import RenderParams
from .sheet import contact_sheet

__all__ = ["GlyphCatalog", "GlyphClass", "GlyphDataset", "RenderParams", "available_scripts", "contact_sheet",
           "glyph_dataset", "load_catalog", "resolve_fonts", "script_classes", "split_classes"]
