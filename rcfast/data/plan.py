"""Epoch plans: image order, sharding and per-sample augmentation parameters.

This module owns every random decision the data pipelines make, so that the
DALI and PIL backends produce the same batches from the same (seed, epoch):

- the order of an epoch is a permutation drawn from (seed, epoch), split across
  shards (`shard_indices`);
- the crop window and flip of an image are a pure function of
  (seed, epoch, image index, image size) (`sample_windows`), computed from a
  counter-based hash rather than a stateful RNG. No worker, thread or prefetch
  state enters, so a run resumed at batch k sees bitwise the same remaining
  batches as a run that never stopped, and sharding does not change which crop
  an image gets.

A window is `(x0, y0, x1, y1)` in pixels of the (EXIF-rotated) source image;
the backends decode the integer box around it, resize exactly the window to
`image_size` x `image_size` with an antialiased bilinear filter and flip the
result horizontally when asked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

AUGMENTS = ("rrc_flip", "center", "none")

# RandomResizedCrop's defaults (torchvision, and the papers rcfast follows).
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_ATTEMPTS = 10
# Evaluation resize: the shorter side goes to image_size * 256 / 224 before the
# centre crop, the usual ImageNet evaluation ratio.
CENTER_RESIZE_RATIO = 256.0 / 224.0

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# Draw slots per image: RRC_ATTEMPTS x (area, log-ratio), then x, y, flip.
_DRAWS_PER_IMAGE = 2 * RRC_ATTEMPTS + 3


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return x ^ (x >> np.uint64(31))


def _stream_key(seed: int, epoch: int) -> np.uint64:
    key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    key = _splitmix64(key ^ np.array([epoch & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return key[0]


def uniforms(seed: int, epoch: int, indices: np.ndarray, draws: int) -> np.ndarray:
    """Uniform [0, 1) floats of shape `[len(indices), draws]`.

    Entry (i, d) depends only on (seed, epoch, indices[i], d): a counter-based
    stream, so any subset of images can be drawn in any order or process.
    """
    with np.errstate(over="ignore"):
        key = _stream_key(seed, epoch)
        idx = np.asarray(indices, dtype=np.uint64).reshape(-1, 1)
        counters = idx * np.uint64(draws) + np.arange(draws, dtype=np.uint64)
        bits = _splitmix64(_splitmix64(counters ^ key))
    # The top 53 bits make an exactly representable double in [0, 1).
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def epoch_order(num_images: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """All image indices in the order of this epoch (shared by every shard)."""
    if not shuffle:
        return np.arange(num_images, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64([seed, epoch, 0x5EED]))
    return rng.permutation(num_images).astype(np.int64)


def shard_indices(order: np.ndarray, shard_id: int, num_shards: int, drop_last: bool) -> np.ndarray:
    """This shard's part of an epoch order.

    Shard s takes positions s, s + S, s + 2S, ... of the order. With
    `drop_last=False` the shards cover every image exactly once and their sizes
    differ by at most one. With `drop_last=True` every shard takes the same
    number of images, floor(N / S) (the < S images left over are different ones
    each epoch), so every rank runs the same number of full batches: what DDP's
    collectives need.
    """
    if drop_last:
        usable = (len(order) // num_shards) * num_shards
        order = order[:usable]
    return order[shard_id::num_shards]


def num_batches(num_images: int, batch_size: int, drop_last: bool) -> int:
    if drop_last:
        return num_images // batch_size
    return -(-num_images // batch_size)


def _rrc_windows(width: np.ndarray, height: np.ndarray, u: np.ndarray) -> np.ndarray:
    """torchvision RandomResizedCrop.get_params, vectorised over images.

    Up to RRC_ATTEMPTS (area, aspect) draws; the first whose box fits wins;
    if none fits, the whole image clamped to the ratio range, centred.
    """
    n = len(width)
    area = (width * height).astype(np.float64)[:, None]
    k = RRC_ATTEMPTS
    target_area = area * (RRC_SCALE[0] + u[:, 0:k] * (RRC_SCALE[1] - RRC_SCALE[0]))
    log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    aspect = np.exp(log_lo + u[:, k:2 * k] * (log_hi - log_lo))
    crop_w = np.rint(np.sqrt(target_area * aspect)).astype(np.int64)
    crop_h = np.rint(np.sqrt(target_area / aspect)).astype(np.int64)
    fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= width[:, None]) & (crop_h <= height[:, None])
    found = fits.any(axis=1)
    first = np.argmax(fits, axis=1)
    rows = np.arange(n)
    cw = np.where(found, crop_w[rows, first], 0)
    ch = np.where(found, crop_h[rows, first], 0)

    # Fallback: the largest centred box within the ratio range.
    in_ratio = width / height
    fb_w = np.where(in_ratio < RRC_RATIO[0], width,
                    np.where(in_ratio > RRC_RATIO[1], np.rint(height * RRC_RATIO[1]).astype(np.int64), width))
    fb_h = np.where(in_ratio < RRC_RATIO[0], np.rint(width / RRC_RATIO[0]).astype(np.int64),
                    height)
    fb_w = np.clip(fb_w, 1, width)
    fb_h = np.clip(fb_h, 1, height)

    cw = np.where(found, cw, fb_w)
    ch = np.where(found, ch, fb_h)
    ux, uy = u[:, 2 * k], u[:, 2 * k + 1]
    x0 = np.where(found, np.floor(ux * (width - cw + 1)).astype(np.int64), (width - cw) // 2)
    y0 = np.where(found, np.floor(uy * (height - ch + 1)).astype(np.int64), (height - ch) // 2)
    return np.stack([x0, y0, x0 + cw, y0 + ch], axis=1).astype(np.float64)


def _center_windows(width: np.ndarray, height: np.ndarray, image_size: int) -> np.ndarray:
    """Resize(shorter side -> round(S*256/224)) + CenterCrop(S), as one window."""
    resized_short = round(image_size * CENTER_RESIZE_RATIO)
    scale = resized_short / np.minimum(width, height).astype(np.float64)
    # The S x S centre crop of the resized image, mapped back to source pixels
    # (clamped for images whose resized shorter side is below S: never here,
    # since round(S*256/224) >= S, but kept exact for any ratio).
    side_w = np.minimum(image_size / scale, width)
    side_h = np.minimum(image_size / scale, height)
    x0 = (width - side_w) / 2.0
    y0 = (height - side_h) / 2.0
    return np.stack([x0, y0, x0 + side_w, y0 + side_h], axis=1)


def sample_windows(augment: str, image_size: int, seed: int, epoch: int,
                   indices: np.ndarray, width: np.ndarray, height: np.ndarray):
    """Crop windows `[n, 4]` (float64 x0, y0, x1, y1) and flips `[n]` (bool).

    `indices` are global image indices (positions in the sorted list of
    readable images): the parameters of an image depend only on
    (seed, epoch, index) and its size.
    """
    width = np.asarray(width, dtype=np.int64)
    height = np.asarray(height, dtype=np.int64)
    n = len(width)
    if augment == "rrc_flip":
        u = uniforms(seed, epoch, indices, _DRAWS_PER_IMAGE)
        windows = _rrc_windows(width, height, u)
        flips = u[:, -1] < 0.5
    elif augment == "center":
        windows = _center_windows(width, height, image_size)
        flips = np.zeros(n, dtype=bool)
    elif augment == "none":
        windows = np.stack([np.zeros(n), np.zeros(n), width, height], axis=1).astype(np.float64)
        flips = np.zeros(n, dtype=bool)
    else:  # guarded by ProxyImages; kept for direct callers
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    return windows, flips


def decode_boxes(windows: np.ndarray, width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """Integer boxes `[n, 4]` (x0, y0, x1, y1) covering each window: what is decoded.

    Both backends decode exactly this box and resample only from it, so they
    see the same pixels (and DALI decodes only this region of a JPEG).
    """
    x0 = np.clip(np.floor(windows[:, 0] + 1e-6), 0, None)
    y0 = np.clip(np.floor(windows[:, 1] + 1e-6), 0, None)
    x1 = np.minimum(np.ceil(windows[:, 2] - 1e-6), width)
    y1 = np.minimum(np.ceil(windows[:, 3] - 1e-6), height)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.int64)


@dataclass
class PlanBatch:
    """One batch of the plan: image indices and what to decode and resample."""

    indices: np.ndarray   # global image indices [n]
    paths: list[str]
    boxes: np.ndarray     # int64 [n, 4]: integer region to decode (x0, y0, x1, y1)
    windows: np.ndarray   # float64 [n, 4]: region to resample, relative to the box origin
    flips: np.ndarray     # bool [n]


class EpochPlanner:
    """Batch k of epoch e of one shard: a pure function of the settings and (e, k).

    The backends hold this object, not the dataset, so a dataset is freed by
    reference counting the moment it is dropped (no cycle through the
    backend's threads and finalizers). Planning reads no file.
    """

    def __init__(self, paths: list[str], widths: np.ndarray, heights: np.ndarray, *, image_size: int,
                 batch_size: int, seed: int, augment: str, shuffle: bool, shard_id: int, num_shards: int,
                 drop_last: bool):
        self.paths, self.widths, self.heights = paths, widths, heights
        self.image_size, self.batch_size, self.seed, self.augment = image_size, batch_size, seed, augment
        self.shuffle, self.shard_id, self.num_shards, self.drop_last = shuffle, shard_id, num_shards, drop_last
        n, s = len(paths), num_shards
        self.num_images = n // s if drop_last else n // s + (1 if shard_id < n % s else 0)
        self.num_batches = num_batches(self.num_images, batch_size, drop_last)
        self._orders: dict[int, np.ndarray] = {}

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Global image indices this shard delivers in `epoch`, in order (read-only)."""
        indices = self._orders.get(epoch)
        if indices is None:
            order = epoch_order(len(self.paths), self.seed, epoch, self.shuffle)
            indices = shard_indices(order, self.shard_id, self.num_shards, self.drop_last)
            if self.drop_last:
                indices = indices[:self.num_batches * self.batch_size]
            indices.setflags(write=False)
            # Kept: this epoch and the one before (a pipeline runs ahead into
            # the next epoch while the consumer finishes this one).
            self._orders = {e: v for e, v in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = indices
        return indices

    def batch_indices(self, epoch: int, k: int) -> np.ndarray:
        return self.epoch_indices(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

    def __call__(self, epoch: int, k: int) -> PlanBatch:
        """Batch k of `epoch`: what to decode (integer boxes) and resample (windows), and the flips."""
        idx = self.batch_indices(epoch, k)
        width, height = self.widths[idx], self.heights[idx]
        windows, flips = sample_windows(self.augment, self.image_size, self.seed, epoch, idx, width, height)
        boxes = decode_boxes(windows, width, height)
        rel_windows = windows - np.concatenate([boxes[:, :2], boxes[:, :2]], axis=1)
        return PlanBatch(idx, [self.paths[i] for i in idx], boxes, rel_windows, flips)
