"""A contact sheet: sample renderings, one row per script, to look at the data set."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .catalog import load_catalog
from .classes import resolve_scripts, split_classes
from .fonts import matplotlib_font_dir
from .render import GlyphRenderer, RenderParams, pil_font


def contact_sheet(path, scripts=None, per_script: int = 16, seed: int = 0, image_size: int = 32,
                  zoom: int = 2, fonts="matplotlib", min_classes: int = 10) -> Image.Image:
    """Save (and return) a PNG grid: per script, `per_script` random classes, one image each.

    `scripts` defaults to every script with at least `min_classes` classes.
    Each row is labelled with the script's name and class count.
    """
    catalog = load_catalog(fonts)
    counts = catalog.counts()
    names = [n for n, c in counts.items() if c >= min_classes] if scripts is None else resolve_scripts(catalog, scripts)
    renderer = GlyphRenderer({f.key: f.path for f in catalog.fonts}, RenderParams(image_size=image_size))
    cell, label_width = image_size * zoom + 2, 175
    sheet = Image.new("RGB", (label_width + per_script * cell, len(names) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    label_font = pil_font(str(matplotlib_font_dir() / "DejaVuSans.ttf"), 12)
    for row, name in enumerate(names):
        draw.text((4, row * cell + cell // 2), f"{name} ({counts[name]})", fill="black", font=label_font,
                  anchor="lm")
        chosen = split_classes(name, min(per_script, counts[name]), seed, fonts=fonts)[0]
        picks = np.random.default_rng(seed).permutation(chosen)
        for col, cid in enumerate(picks):
            cls = catalog.classes[cid]
            pixels = renderer.render(seed, cls.codepoint, col, list(cls.fonts))
            tile = Image.fromarray(pixels).resize((image_size * zoom,) * 2, Image.Resampling.NEAREST)
            sheet.paste(tile, (label_width + col * cell + 1, row * cell + 1))
    # A 256-colour palette keeps the sheet small enough to live in a repository.
    sheet.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, format="PNG")
    return sheet
