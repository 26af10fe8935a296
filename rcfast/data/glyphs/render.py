"""Rendering one glyph image: a pure function of (seed, class, image index).

`GlyphRenderer.render(seed, codepoint, index, font_keys)` draws image
`index` of a class from its own random stream,
`numpy.random.default_rng([seed, codepoint, index])`, so an image never
depends on which other images, splits or processes were rendered with it.
Per image it draws, in this order:

1. the font (one of the fonts that really hold the character, uniformly);
2. extra stroke thickness (FreeType's stroker, 0 to `max_stroke` pixels at
   the supersampled size);
3. geometry: the glyph placed by its anchor (the middle of its advance
   width, a quarter em above the baseline) at the image centre, so position
   and size within the line are kept; then scale, rotation, horizontal shear
   and translation; a glyph that would leave the image is shrunk to fit (so
   it is never cut off, never blank);
4. the background: a flat colour, a two-colour gradient, or a crop of one of
   scikit-learn's two sample photographs (`load_sample_images`, shipped inside
   scikit-learn; read from its files without importing scikit-learn) with
   its contrast reduced;
5. the ink: a flat colour or a photograph crop, whose mean luminance differs
   from the background's by at least `min_contrast` (so the glyph is always
   legible);
6. composition: the glyph's coverage is drawn at `supersample` times the
   output size and box-averaged down (anti-aliasing), then ink and background
   are mixed by it; then Gaussian blur and Gaussian pixel noise.

Glyphs are drawn with Pillow's FreeType binding and its BASIC layout (one
glyph per character, no shaping engine), so the result does not depend on
whether libraqm is installed. Byte-identical output needs the same font
files, Pillow/FreeType and NumPy versions; the data set manifest records them.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ANCHOR_HEIGHT = 0.25  # em above the baseline: the middle of a line from descender to accented capital
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601 luminance weights


@dataclass(frozen=True)
class RenderParams:
    """The variation of the rendered images (recorded in the manifest).

    Ranges are uniform; angles in degrees; lengths as fractions of the side.
    """

    image_size: int = 32
    supersample: int = 2          # drawn at this multiple of image_size, then box-averaged down
    em_fraction: float = 0.72     # pixels per em, as a fraction of the side, before `scale`
    scale: tuple[float, float] = (0.9, 1.1)
    max_rotation: float = 15.0
    max_shear: float = 0.3        # horizontal shear (x += shear * y)
    max_translation: float = 0.08
    fill_limit: float = 0.94      # the glyph's box never exceeds this fraction of the side
    max_stroke: int = 1           # extra stroke width, supersampled pixels (more merges Braille dots)
    p_background_photo: float = 0.4
    p_background_gradient: float = 0.3
    p_ink_photo: float = 0.25
    background_photo_contrast: tuple[float, float] = (0.3, 0.8)
    ink_photo_contrast: tuple[float, float] = (0.2, 0.5)
    photo_crop: tuple[float, float] = (0.12, 0.5)  # crop side, fraction of the photo's shorter side
    min_contrast: float = 0.4     # |mean luminance of ink - of background|, in [0, 1]
    p_blur: float = 0.5
    blur_sigma: tuple[float, float] = (0.3, 0.8)   # output pixels
    max_noise: float = 0.05       # std of Gaussian pixel noise, in [0, 1] intensity

    def __post_init__(self):
        for name in ("image_size", "supersample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {self.image_size}")
        if isinstance(self.max_stroke, bool) or not isinstance(self.max_stroke, int) or self.max_stroke < 0:
            raise ValueError(f"max_stroke must be a non-negative integer, got {self.max_stroke!r}")
        if not 0.0 < self.min_contrast <= 0.5:
            raise ValueError(f"min_contrast must be in (0, 0.5], got {self.min_contrast!r}")
        for name in ("p_background_photo", "p_background_gradient", "p_ink_photo", "p_blur"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)!r}")
        if self.p_background_photo + self.p_background_gradient > 1.0:
            raise ValueError("p_background_photo + p_background_gradient must not exceed 1")

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@lru_cache(maxsize=256)
def pil_font(path: str, em_pixels: int) -> ImageFont.FreeTypeFont:
    """A FreeType font at `em_pixels` pixels per em (BASIC layout: no shaping engine)."""
    return ImageFont.truetype(path, em_pixels, layout_engine=ImageFont.Layout.BASIC)


@dataclass(frozen=True)
class Glyph:
    """A character's coverage (uint8, cropped to its ink) and where it sits in the line.

    `offset` is the (x, y) pixel position of the bitmap's top-left corner
    relative to the glyph's anchor: the middle of its advance width,
    `ANCHOR_HEIGHT` em above the baseline (y grows downwards). Placing every
    glyph by its anchor keeps what its position and size say: Braille dots 1
    and 2 differ only by height, 'o' and 'O' mostly by size.
    """

    bitmap: np.ndarray
    offset: tuple[float, float]


def glyph_bitmap(font: ImageFont.FreeTypeFont, char: str, stroke: int = 0) -> Glyph | None:
    """The character as FreeType draws it, or None when it has no ink."""
    left, top, right, bottom = font.getbbox(char, stroke_width=stroke, anchor="ls")
    if right <= left or bottom <= top:
        return None
    image = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(image).text((-left, -top), char, font=font, fill=255, stroke_width=stroke, stroke_fill=255,
                               anchor="ls")
    bitmap = np.asarray(image)
    rows, cols = np.nonzero(bitmap)
    if rows.size == 0:
        return None
    advance = font.getlength(char)
    anchor_x = advance / 2.0 if advance > 0 else left + (cols.min() + cols.max() + 1) / 2.0
    anchor_y = -ANCHOR_HEIGHT * font.size
    bitmap = bitmap[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    return Glyph(bitmap=bitmap, offset=(left + cols.min() - anchor_x, top + rows.min() - anchor_y))


def sample_photo_paths() -> list[str]:
    """scikit-learn's sample photographs (china.jpg, flower.jpg), the files `load_sample_images` reads.

    Found without importing scikit-learn: `import sklearn.datasets` costs
    seconds, paid again by every worker process.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("rcfast.data.glyphs needs scikit-learn for its sample photographs (pip install scikit-learn)")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "images"
    paths = sorted(str(p) for p in folder.glob("*.jpg"))
    if not paths:
        raise FileNotFoundError(f"no sample photographs (*.jpg) in {str(folder)!r}")
    return paths


@lru_cache(maxsize=1)
def _photos() -> tuple[Image.Image, ...]:
    photos = []
    for path in sample_photo_paths():
        with Image.open(path) as image:
            # Halved (to 320 x 213): crops are shrunk to a few dozen pixels anyway,
            # and resampling from a quarter of the pixels is four times cheaper.
            photos.append(image.convert("RGB").reduce(2))
    return tuple(photos)


def _luminance(rgb: np.ndarray) -> float:
    """Mean luminance of an RGB image (or colour) in [0, 1]."""
    return float(rgb.reshape(-1, 3).mean(axis=0) @ _LUMA)


def _colour_with_luminance(rng: np.random.Generator, target: float) -> np.ndarray:
    """A random colour mixed with black or white to the target luminance exactly."""
    colour = rng.random(3).astype(np.float32)
    lum = float(colour @ _LUMA)
    if lum > target:
        return colour * (target / lum)
    return colour + (1.0 - colour) * ((target - lum) / max(1e-6, 1.0 - lum))


def _ink_luminance(rng: np.random.Generator, background: float, contrast: float) -> float:
    """An ink luminance at least `contrast` away from the background's."""
    if background >= 0.5:
        return float(rng.uniform(0.0, background - contrast))
    return float(rng.uniform(background + contrast, 1.0))


class GlyphRenderer:
    """Renders glyph images for a fixed font set and `RenderParams` (one per process)."""

    def __init__(self, font_paths: dict[str, str], params: RenderParams):
        self.font_paths = dict(font_paths)
        self.params = params
        self._glyphs: dict[tuple, np.ndarray] = {}

    def glyph(self, font_key: str, codepoint: int, stroke: int) -> Glyph:
        key = (font_key, codepoint, stroke)
        if key not in self._glyphs:
            if len(self._glyphs) > 4096:  # classes come in chunks: an old class's glyphs are not needed again
                self._glyphs.clear()
            p = self.params
            em = max(4, round(p.em_fraction * p.image_size * p.supersample))
            glyph = glyph_bitmap(pil_font(self.font_paths[font_key], em), chr(codepoint), stroke)
            if glyph is None:
                raise ValueError(f"font {font_key!r} has no ink for U+{codepoint:04X}; "
                                 "the glyph catalogue should have excluded it")
            self._glyphs[key] = glyph
        return self._glyphs[key]

    def _coverage(self, rng: np.random.Generator, glyph: Glyph) -> np.ndarray:
        """The glyph transformed (its anchor near the centre), drawn supersampled and box-averaged
        down: coverage in [0, 1], [S, S]."""
        p = self.params
        side = p.image_size * p.supersample
        scale = rng.uniform(*p.scale)
        angle = math.radians(rng.uniform(-p.max_rotation, p.max_rotation))
        shear = rng.uniform(-p.max_shear, p.max_shear)
        shift = rng.uniform(-p.max_translation, p.max_translation, size=2) * side
        cos, sin = math.cos(angle), math.sin(angle)
        forward = scale * np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]])
        h, w = glyph.bitmap.shape
        x0, y0 = glyph.offset
        corners = forward @ np.array([[x0, x0 + w, x0, x0 + w], [y0, y0, y0 + h, y0 + h]])
        # Shrink a glyph that would leave the canvas, then keep the shift inside it.
        limit = p.fill_limit * side / 2.0
        reach = np.abs(corners).max()
        if reach > limit:
            forward *= limit / reach
            corners *= limit / reach
        shift = np.clip(shift, -limit - corners.min(axis=1), limit - corners.max(axis=1))
        inverse = np.linalg.inv(forward)
        # Output pixel u shows bitmap pixel inverse @ (u - centre - shift) - offset.
        offset = -inverse @ (np.array([side / 2.0, side / 2.0]) + shift) - np.array([x0, y0])
        coeffs = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
        moved = Image.fromarray(glyph.bitmap).transform((side, side), Image.Transform.AFFINE, coeffs,
                                                        resample=Image.Resampling.BILINEAR, fillcolor=0)
        return np.asarray(moved.reduce(p.supersample), dtype=np.float32) / 255.0

    def _photo_crop(self, rng: np.random.Generator, side: int) -> np.ndarray:
        photos = _photos()
        photo = photos[int(rng.integers(len(photos)))]
        width, height = photo.size
        crop = rng.uniform(*self.params.photo_crop) * min(width, height)
        x0, y0 = rng.uniform(0, width - crop), rng.uniform(0, height - crop)
        patch = photo.resize((side, side), Image.Resampling.BILINEAR, box=(x0, y0, x0 + crop, y0 + crop))
        return np.asarray(patch, dtype=np.float32) / 255.0

    def _background(self, rng: np.random.Generator, side: int) -> np.ndarray:
        p = self.params
        kind = rng.random()
        if kind < p.p_background_photo:
            photo = self._photo_crop(rng, side)
            mean = photo.mean(axis=(0, 1), keepdims=True)
            return mean + (photo - mean) * rng.uniform(*p.background_photo_contrast)
        first = _colour_with_luminance(rng, rng.uniform(0.0, 1.0))
        if kind < p.p_background_photo + p.p_background_gradient:
            second = _colour_with_luminance(rng, np.clip(_luminance(first) + rng.uniform(-0.25, 0.25), 0, 1))
            direction = rng.uniform(0, 2 * math.pi)
            axis = np.linspace(-0.5, 0.5, side, dtype=np.float32)
            ramp = math.cos(direction) * axis[None, :] + math.sin(direction) * axis[:, None] + 0.5
            ramp = np.clip(ramp, 0.0, 1.0)[..., None]
            return first * (1 - ramp) + second * ramp
        return np.broadcast_to(first, (side, side, 3))

    def _ink(self, rng: np.random.Generator, side: int, background_luminance: float) -> np.ndarray:
        p = self.params
        target = _ink_luminance(rng, background_luminance, p.min_contrast)
        if rng.random() < p.p_ink_photo:
            photo = self._photo_crop(rng, side)
            texture = photo - photo.mean(axis=(0, 1), keepdims=True)
            grey = np.full(3, target, np.float32)
            return grey + texture * rng.uniform(*p.ink_photo_contrast)
        return np.broadcast_to(_colour_with_luminance(rng, target), (side, side, 3))

    def render(self, seed: int, codepoint: int, index: int, font_keys) -> np.ndarray:
        """Image `index` of class `codepoint`: uint8 [S, S, 3]. `font_keys`: the fonts holding it."""
        return self.render_with_coverage(seed, codepoint, index, font_keys)[0]

    def render_with_coverage(self, seed: int, codepoint: int, index: int, font_keys):
        """`render`'s image and the glyph's coverage (float32 [S, S] in [0, 1]) it was drawn with."""
        p = self.params
        rng = np.random.default_rng([seed, codepoint, index])
        side = p.image_size
        font_key = font_keys[int(rng.integers(len(font_keys)))]
        stroke = int(rng.integers(0, p.max_stroke + 1))
        coverage = self._coverage(rng, self.glyph(font_key, codepoint, stroke))
        background = self._background(rng, side)
        ink = self._ink(rng, side, _luminance(background))
        image = background * (1.0 - coverage[..., None]) + ink * coverage[..., None]
        if rng.random() < p.p_blur:
            radius = float(rng.uniform(*p.blur_sigma))
            pixels = Image.fromarray(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8))
            image = np.asarray(pixels.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255.0
        noise = rng.uniform(0.0, p.max_noise)
        image = image + rng.normal(0.0, noise, size=image.shape).astype(np.float32)
        return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8), coverage
