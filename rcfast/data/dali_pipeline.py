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

On a CPU, when every window is a whole integer box (augment "rrc_flip" and
"none"), the resampling is done by torch instead of `fn.resize`: DALI decodes
the boxes and a finishing thread resizes each with
`F.interpolate(..., mode="bilinear", antialias=True)` on uint8 channels-last
tensors (torch's vectorised path, about 5x cheaper per image than DALI's CPU
resize here and designed to match PIL's filter), flips and normalises, image
by image over `num_threads` pool threads that each run torch with one
intra-op thread (an OpenMP setting of those threads only, so the caller's
torch threads are untouched). Finished batches wait in a queue of `prefetch`
batches. Fractional windows ("center") and
GPUs keep the all-DALI graph.
"""

from __future__ import annotations

import ctypes
import functools
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

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


def _encoded_batches(batches, with_roi: bool):
    """External-source generator: one tuple of per-image arrays per batch."""
    for b in batches:
        encoded = [np.fromfile(p, dtype=np.uint8) for p in b.paths]
        anchors = list(b.boxes[:, :2].astype(np.int32))
        shapes = list((b.boxes[:, 2:] - b.boxes[:, :2]).astype(np.int32))
        if with_roi:
            yield (encoded, anchors, shapes) + _roi(b.windows, b.flips)
        else:
            yield encoded, anchors, shapes


def _whole_boxes(batches) -> bool:
    """True when every window is exactly its decode box (no sub-pixel ROI)."""
    return all(np.array_equal(b.windows[:, :2], np.zeros_like(b.windows[:, :2]))
               and np.array_equal(b.windows[:, 2:], (b.boxes[:, 2:] - b.boxes[:, :2]).astype(np.float64))
               for b in batches)


@functools.lru_cache(maxsize=None)
def _openmp_runtime():
    """The OpenMP runtime torch loaded (libgomp/libiomp), or None if not found."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line})
    except OSError:  # not Linux
        return None
    for path in paths:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def _one_openmp_thread_here() -> None:
    """Limit torch ops run by *this* thread to one intra-op thread.

    The finishing threads do many small resizes; letting each spawn an OpenMP
    team oversubscribes the cores shared with DALI's decoders and training
    (measured: 638 vs 790 images/s). torch.set_num_threads cannot do this: it
    also sets the default that every thread, the training loop's included,
    picks up on its first parallel op. omp_set_num_threads sets only the calling
    thread's OpenMP setting. torch's per-thread lazy initialisation (which would
    reset it) is triggered first. Without a findable runtime this is only a
    missed speed-up, never a change of results.
    """
    torch.get_num_threads()
    runtime = _openmp_runtime()
    if runtime is not None:
        runtime.omp_set_num_threads(1)


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
        self._mean_t = torch.tensor(self._mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std_t = torch.tensor(self._std, dtype=torch.float32).view(1, 3, 1, 1)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        # DALI writes float16 itself; bfloat16 is not a DALI type, so it is
        # produced from float32 on the torch side.
        self._dali_dtype = types.FLOAT16 if dtype == torch.float16 else types.FLOAT

    def _build(self, batches, decode_only: bool = False) -> Pipeline:
        on_gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None
                     else torch.cuda.current_device()) if on_gpu else None
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.num_threads,
                        device_id=device_id, prefetch_queue_depth=self.prefetch)
        with pipe:
            inputs = fn.external_source(
                source=_encoded_batches(batches, with_roi=not decode_only),
                num_outputs=3 if decode_only else 5, batch=True,
                dtype=[types.UINT8, types.INT32, types.INT32] + ([] if decode_only else [types.FLOAT, types.FLOAT]))
            encoded, anchor, shape = inputs[:3]
            images = fn.decoders.image_slice(
                encoded, anchor, shape, device="mixed" if on_gpu else "cpu",
                output_type=types.RGB, axis_names="WH",
                normalized_anchor=False, normalized_shape=False)
            if decode_only:
                pipe.set_outputs(images)
                pipe.build()
                return pipe
            roi_start, roi_end = inputs[3:]
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
        if self.device.type == "cpu" and _whole_boxes(batches):
            yield from self._iterate_torch_resample(batches)
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

    # ------------------------------------------- CPU: DALI decode, torch resample
    def _iterate_torch_resample(self, batches):
        pipe = self._build(batches, decode_only=True)
        if self._pool is None:
            self._pool_size = self.num_threads
            self._pool = ThreadPoolExecutor(self._pool_size, thread_name_prefix="rcfast-dali-finish",
                                            initializer=_one_openmp_thread_here)
        finished: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    finished.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def finish_batches():
            try:
                for b in batches:
                    (slices,) = pipe.run()
                    if not put(self._finish(slices, b.flips)):
                        return
            except BaseException as e:  # handed to the consumer, raised there
                put(e)

        worker = threading.Thread(target=finish_batches, name="rcfast-dali-finish", daemon=True)
        worker.start()
        try:
            for _ in range(len(batches)):
                item = finished.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            worker.join()
            del pipe

    def _finish(self, slices, flips) -> torch.Tensor:
        """Decoded boxes (uint8 HWC) -> resized, flipped, normalised NCHW batch.

        Images are finished one by one, each entirely in cache (resize, flip,
        convert, normalise), split over `num_threads` threads: torch releases
        the GIL, so they run in parallel with each other and with DALI.
        """
        n, size = len(slices), self.image_size
        out = torch.empty((n, 3, size, size), dtype=torch.float32)
        mean, std = self._mean_t[0], self._std_t[0]

        def finish(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                # HWC storage seen as CHW: channels-last, the layout of torch's
                # fast uint8 antialiased resize.
                image = torch.from_numpy(np.asarray(slices[i])).permute(2, 0, 1).unsqueeze(0)
                if image.shape[-2:] != (size, size):
                    image = F.interpolate(image, size=(size, size), mode="bilinear",
                                          antialias=True, align_corners=False)
                out[i].copy_(image[0].flip(-1) if flips[i] else image[0])
                out[i].sub_(mean).div_(std)

        chunks = np.linspace(0, n, self._pool_size + 1).astype(int)
        futures = [self._pool.submit(finish, lo, hi) for lo, hi in zip(chunks[:-1], chunks[1:]) if hi > lo]
        for f in futures:
            f.result()
        return out if self.dtype == torch.float32 else out.to(self.dtype)
