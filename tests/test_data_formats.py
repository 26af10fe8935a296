"""rcfast.data pixel formats: the PIL and DALI backends agree on every kind of image they both read.

16-bit grey PNG/TIFF (PIL used to clip them to almost white: mean 252 vs DALI's
127.5), 16-bit RGB/LA/RGBA PNG, palette with and without transparency, LA/RGBA
8-bit, CMYK and grey JPEG, and EXIF-rotated JPEG/PNG/WebP/TIFF. Each case is
decoded by both backends with augment=None (the whole image squashed to S x S)
at a size where the resampling is exact, so the comparison sees the decoders.
"""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.images import png16, smooth_rgb
from rcfast.data import IMAGENET_MEAN, IMAGENET_STD, ProxyImages

pytest.importorskip("nvidia.dali")

W, H = 48, 32
ONE_LEVEL = 1 / 255 / min(IMAGENET_STD)  # one grey level, normalised


def _ramp16() -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    return (x * 1365 + y * 20).astype(np.uint16)  # 0 .. ~64k: every 16-bit range


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _cases() -> dict[str, bytes]:
    ramp = _ramp16()
    rgb16 = np.stack([ramp, 65535 - ramp, ramp // 2 + 1000], axis=-1).astype(np.uint16)
    rgb = Image.fromarray(smooth_rgb(W, H, seed=3))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(90)
    cases = {
        "grey16.png": _save(Image.fromarray(ramp), "PNG"),
        "grey16.tif": _save(Image.fromarray(ramp), "TIFF"),
        "rgb16.png": png16(rgb16),
        "la16.png": png16(np.stack([ramp, 65535 - ramp], axis=-1)),
        "rgba16.png": png16(np.concatenate([rgb16, ramp[..., None]], axis=-1)),
        "palette.png": _save(palette, "PNG"),
        "palette_transparent.png": _save(palette, "PNG", transparency=0),
        "la.png": _save(rgb.convert("LA"), "PNG"),
        "rgba.png": _save(rgba, "PNG"),
        "grey.jpg": _save(rgb.convert("L"), "JPEG", quality=95),
        "cmyk.jpg": _save(rgb.convert("CMYK"), "JPEG", quality=95),
    }
    for orientation in (3, 6, 8):
        for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("TIFF", "tif")):
            extra = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
            cases[f"exif{orientation}.{ext}"] = _save(rgb, fmt, exif=_exif(orientation), **extra)
    return cases


@pytest.fixture(scope="module")
def format_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    for name, data in _cases().items():
        (root / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def both_backends(format_folder):
    """name -> (DALI image, PIL image), each [3, S, S] normalised."""
    out = {}
    for backend in ("dali", "pil"):
        ds = ProxyImages(format_folder, image_size=24, batch_size=64, augment=None, backend=backend,
                         device="cpu", num_threads=1)
        assert ds.skipped == [] and ds.total_images == len(_cases())
        names = [p.rsplit("/", 1)[1] for p in ds._images.paths]
        for name, image in zip(names, next(iter(ds))):
            out.setdefault(name, []).append(image)
        ds.close()
    return out


def _pixels(image: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: 0-255 grey levels."""
    std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    return (image * std + mean) * 255


@pytest.mark.parametrize("name", sorted(_cases()))
def test_pil_and_dali_agree_on_every_format(both_backends, name):
    dali, pil = both_backends[name]
    diff = (dali - pil).abs()
    # Within one grey level (16-bit RGB: PIL keeps the high byte, DALI rounds;
    # JPEG: two libjpeg-turbo builds) on average and at worst two.
    assert diff.mean() < ONE_LEVEL, (name, diff.mean() / ONE_LEVEL)
    assert diff.max() < 2.01 * ONE_LEVEL, (name, diff.max() / ONE_LEVEL)


def test_16_bit_grey_is_scaled_not_clipped(both_backends):
    """Regression: the PIL backend clipped 16-bit grey to 255 (mean 252 vs 127.5 on DALI)."""
    expected = float(np.mean(np.rint(_ramp16() / 257.0)))  # the full 16-bit range, scaled
    for name in ("grey16.png", "grey16.tif"):
        for image in both_backends[name]:
            pixels = _pixels(image)
            assert abs(pixels.mean().item() - expected) < 1.0, (name, pixels.mean().item(), expected)
            assert torch.allclose(pixels[0], pixels[1], atol=1e-3)  # grey stays grey


def test_exif_rotation_is_applied_by_both_backends(both_backends):
    """The 90-degree rotations see the source transposed: their pictures differ from the 180-degree one."""
    for ext in ("jpg", "png", "webp", "tif"):
        turned_180 = both_backends[f"exif3.{ext}"][1]
        turned_90 = both_backends[f"exif6.{ext}"][1]
        turned_270 = both_backends[f"exif8.{ext}"][1]
        assert (turned_90 - turned_180).abs().mean() > 10 * ONE_LEVEL
        # 90 and 270 degrees are each other's 180-degree turn.
        assert (turned_90 - turned_270.flip(-1, -2)).abs().mean() < ONE_LEVEL
