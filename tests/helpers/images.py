"""Image files for the data tests: smooth test pictures, 16-bit PNGs, decompression bombs, damaged JPEGs.

PIL cannot write 16-bit RGB/LA/RGBA PNGs, so `png16` writes them by hand
(IHDR, one zlib IDAT, IEND); `png_bomb` streams a huge all-black PNG into a
small file without ever holding the pixels.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def smooth_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth uint8 [H, W, 3] picture (gradients and waves: JPEG-friendly, not constant)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    c = rng.uniform(0.5, 3.0, size=3)
    rgb = np.stack([(np.sin(x / 9 * c[0]) + 1) * 127, (np.cos(y / 7 * c[1]) + 1) * 127,
                    ((x + y) * c[2]) % 255], axis=-1)
    return rgb.astype(np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return _PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG of a uint16 [H, W, C] array, C = 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA)."""
    height, width, channels = array.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + array[r].astype(">u2").tobytes() for r in range(height))
    return _png(width, height, 16, color_type, zlib.compress(raw))


def png_bomb(side: int) -> bytes:
    """A valid side x side 8-bit grey PNG, all black: a few hundred KB that decode to side^2 bytes."""
    compressor = zlib.compressobj(1)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return _png(side, side, 8, 0, idat)


def jpeg_bytes(image: Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **save_args)
    return buffer.getvalue()


def damaged_jpegs(width: int = 320, height: int = 240) -> dict[str, bytes]:
    """JPEGs with damaged entropy-coded data that PIL decodes without any error.

    libjpeg warns on each ("Corrupt JPEG data: ..."); the decoded pixels are
    partly garbage. (Not every damage shows: a zeroed run or a single flipped
    bit can still decode into valid codes of the right total length, and no
    decoder can tell.)
    """
    data = jpeg_bytes(Image.fromarray(smooth_rgb(width, height, seed=7)), quality=90)
    scan = data.index(b"\xff\xda")  # start of scan: entropy-coded data follows
    flipped = bytearray(data)
    for k in range(scan + 400, scan + 2400, 97):
        flipped[k] ^= 0x5A
    overwritten = bytearray(data)
    overwritten[scan + 3000:scan + 3200] = np.random.default_rng(0).integers(0, 255, 200, dtype=np.uint8).tobytes()
    cut = bytearray(data)
    del cut[scan + 2000:scan + 2100]
    return {"flipped_bits.jpg": bytes(flipped), "random_run.jpg": bytes(overwritten), "cut_middle.jpg": bytes(cut)}
