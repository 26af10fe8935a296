"""The DALI backend: decode, crop, resize, flip and normalise in an NVIDIA DALI pipeline.

On a GPU the JPEG decode runs with `device="mixed"` (nvJPEG, Huffman on the
host, IDCT on the GPU) and everything after it on the GPU; on a CPU the same
graph runs as a CPU-only pipeline (`device_id=None`).

Why `fn.external_source` and not `fn.readers.file`: the plan
(`rcfast.data.plan`) decides the order, the shard and every crop window and
flip from (seed, epoch, image index), so batches are bitwise reproducible and a
resumed epoch starts at any batch without reading, let alone decoding, the
files before it. The source hands DALI the encoded bytes of one batch plus,
per image, the integer box to decode (`fn.decoders.image_slice`, which decodes
only that region of a JPEG) and the window to resample (`fn.resize` ROI; a
reversed ROI is the horizontal flip, at no cost). DALI's own random operators
are not used, so nothing depends on DALI's seeds or thread scheduling.
"""

from __future__ import annotations

import numpy as np
import torch

import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type


def _roi(windows: np.ndarray, flips: np.ndarray):
    """fn.resize ROIs, in (y, x) order; a flipped image gets x0 > x1."""
    x0, y0, x1, y1 = (windows[:, i].astype(np.float32) for i in range(4))
    start = np.stack([y0, np.where(flips, x1, x0)], axis=1)
    end = np.stack([y1, np.where(flips, x0, x1)], axis=1)
    return list(start), list(end)


def _encoded_batches(batches):
    """External-source generator: one tuple of per-image arrays per batch."""
    for b in batches:
        encoded = [np.fromfile(p, dtype=np.uint8) for p in b.paths]
        anchors = list(b.boxes[:, :2].astype(np.int32))
        shapes = list((b.boxes[:, 2:] - b.boxes[:, :2]).astype(np.int32))
        roi_start, roi_end = _roi(b.windows, b.flips)
        yield encoded, anchors, shapes, roi_start, roi_end


class DaliBatches:
    """Turns plan batches into normalised NCHW tensors on `device` with DALI."""

    def __init__(self, image_size: int, batch_size: int, num_threads: int, device: torch.device,
                 dtype: torch.dtype, mean, std, prefetch: int = 2):
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_threads = max(1, num_threads)
        self.device = device
        self.dtype = dtype
        self.prefetch = max(1, prefetch)
        self._mean = [255.0 * m for m in mean]
        self._std = [255.0 * s for s in std]
        # DALI writes float16 itself; bfloat16 is not a DALI type, so it is
        # produced from float32 on the torch side.
        self._dali_dtype = types.FLOAT16 if dtype == torch.float16 else types.FLOAT

    def _build(self, batches) -> Pipeline:
        on_gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None
                     else torch.cuda.current_device()) if on_gpu else None
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.num_threads,
                        device_id=device_id, prefetch_queue_depth=self.prefetch)
        with pipe:
            encoded, anchor, shape, roi_start, roi_end = fn.external_source(
                source=_encoded_batches(batches), num_outputs=5, batch=True,
                dtype=[types.UINT8, types.INT32, types.INT32, types.FLOAT, types.FLOAT])
            images = fn.decoders.image_slice(
                encoded, anchor, shape, device="mixed" if on_gpu else "cpu",
                output_type=types.RGB, axis_names="WH",
                normalized_anchor=False, normalized_shape=False)
            # Antialiased bilinear, the filter PIL's BILINEAR resize uses.
            # Float output skips a rounding pass and is faster on the CPU.
            images = fn.resize(images, size=(self.image_size, self.image_size),
                               roi_start=roi_start, roi_end=roi_end, roi_relative=False,
                               interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT)
            images = fn.crop_mirror_normalize(images, dtype=self._dali_dtype, output_layout="CHW",
                                              mean=self._mean, std=self._std)
            pipe.set_outputs(images)
        pipe.build()
        return pipe

    def iterate(self, batches):
        """Yield one normalised image tensor per plan batch, in order."""
        if not batches:
            return
        pipe = self._build(batches)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        try:
            for _ in range(len(batches)):
                (images,) = pipe.run()
                yield self._to_torch(images, stream)
        finally:
            # Frees the pipeline's threads and buffers now rather than at GC.
            del pipe

    def _to_torch(self, tensor_list, stream) -> torch.Tensor:
        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=self.device)
        # One copy, straight from DALI's buffer into the torch tensor.
        feed_ndarray(dense, out, cuda_stream=stream)
        return out if out.dtype == self.dtype else out.to(self.dtype)
