"""The DALI backend: decode, crop, resize, flip and normalise in one NVIDIA DALI pipeline per dataset.

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

One pipeline lives as long as the dataset (or until `close()`), across
epochs. Every batch is named by its tag (epoch, batch index), and a batch's
content is a pure function of its tag. The consumer submits tags ahead of
what it has received, running on past the end of an epoch into the next one
(the order a training loop asks for), so the pipeline never drains and refills
between epochs. When the next request is not the batch submitted next (a
`set_epoch` jump, `load_state_dict`), the batches in flight are dropped (a
new *generation* starts) and the pipeline goes on with the requested ones: at
most a few batches of wasted decode, and resume stays exact.

On a CPU, when every window is a whole integer box (augment "rrc_flip" and
"none"), the resampling is done by torch instead of `fn.resize`: DALI decodes
the boxes and a producer thread hands each batch to `num_threads` finishing
threads that resize each image with
`F.interpolate(..., mode="bilinear", antialias=True)` on uint8 channels-last
tensors (torch's vectorised path, about 5x cheaper per image than DALI's CPU
resize here and designed to match PIL's filter), flip and normalise.
Finishing threads limit their *own* OpenMP team to one thread through
threadpoolctl (`omp_set_num_threads` is per calling thread): many small
resizes, each forking an OpenMP team, oversubscribe the cores shared with
DALI's decoders and training. The caller's torch thread count is untouched.
Finished batches wait in a queue of `prefetch` batches. Fractional windows
("center") and GPUs keep the all-DALI graph, run in the consumer's thread.
"""

from __future__ import annotations

import atexit
import collections
import queue
import threading
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

Tag = tuple  # (epoch, batch index)
_STOP = object()


def _roi(windows: np.ndarray, flips: np.ndarray):
    """fn.resize ROIs, in (y, x) order; a flipped image gets x0 > x1."""
    x0, y0, x1, y1 = (windows[:, i].astype(np.float32) for i in range(4))
    start = np.stack([y0, np.where(flips, x1, x0)], axis=1)
    end = np.stack([y1, np.where(flips, x0, x1)], axis=1)
    return list(start), list(end)


def _encoded(batch, with_roi: bool) -> tuple:
    """External-source arrays of one plan batch."""
    encoded = [np.fromfile(p, dtype=np.uint8) for p in batch.paths]
    anchors = list(batch.boxes[:, :2].astype(np.int32))
    shapes = list((batch.boxes[:, 2:] - batch.boxes[:, :2]).astype(np.int32))
    if with_roi:
        return (encoded, anchors, shapes) + tuple(_roi(batch.windows, batch.flips))
    return encoded, anchors, shapes


def whole_boxes(batch) -> bool:
    """True when every window of a plan batch is exactly its decode box (no sub-pixel ROI)."""
    return (np.array_equal(batch.windows[:, :2], np.zeros_like(batch.windows[:, :2]))
            and np.array_equal(batch.windows[:, 2:], (batch.boxes[:, 2:] - batch.boxes[:, :2]).astype(np.float64)))


def _describe(batch, shown: int = 3) -> str:
    names = ", ".join(batch.paths[:shown])
    more = f" and {len(batch.paths) - shown} more" if len(batch.paths) > shown else ""
    return f"{names}{more}"


class _OpenMPLimit:
    """Pool-thread initializer: torch ops in this thread run without an OpenMP team.

    threadpoolctl finds the OpenMP runtimes loaded in the process (torch's
    libgomp/libiomp among them) and calls their `omp_set_num_threads(1)`, which
    sets the calling thread's limit only. torch's per-thread lazy thread
    initialisation (which would reset it) is triggered first. When torch does
    not use OpenMP, or no runtime is found, a warning says so (results are the
    same; finishing is only slower).
    """

    def __init__(self):
        from threadpoolctl import ThreadpoolController
        self._controller = ThreadpoolController().select(user_api="openmp")
        if not self._controller.lib_controllers and torch.backends.openmp.is_available():
            warnings.warn("rcfast.data: threadpoolctl found no OpenMP runtime in this process, so DALI's "
                          "finishing threads cannot limit their OpenMP teams (same results, slower)",
                          RuntimeWarning, stacklevel=4)

    def __call__(self) -> None:
        torch.get_num_threads()
        self._controller.limit(limits=1)


class _Feed:
    """The external source's callback: plan batches in submission order, with their tags.

    `todo` is filled by the consumer; the callback runs in whichever thread runs
    the pipeline, drops items of stale generations before reading any file,
    and records what it fed in `fed` so outputs can be matched to tags.
    """

    def __init__(self, with_roi: bool):
        self.with_roi = with_roi
        self.todo: queue.Queue = queue.Queue()
        self.fed: collections.deque = collections.deque()
        self.generation = 0

    def __call__(self):
        while True:
            item = self.todo.get()
            if item is _STOP:
                raise StopIteration
            if item[0] == self.generation:
                break
        self.fed.append(item)
        return _encoded(item[2], self.with_roi)


class _Engine:
    """One built DALI pipeline, its feed and (CPU torch finishing) its producer thread.

    Kept apart from `DaliBatches` so the producer thread never references the
    object a user holds: dropping that object closes the engine (weakref
    finalizer), and the pipeline is freed by reference counting, not left for
    the garbage collector.
    """

    def __init__(self, owner: "DaliBatches", finish: "_Finisher | None"):
        self.torch_resample = finish is not None
        self.feed = _Feed(with_roi=not self.torch_resample)
        self.pipe = owner._build(self.feed)
        self.device = owner.device
        self.dtype = owner.dtype
        self.finish = finish
        self.error: BaseException | None = None
        self._thread = None
        if self.torch_resample:
            self.done: queue.Queue = queue.Queue(maxsize=owner.prefetch)
            self.stop = threading.Event()
            self._thread = threading.Thread(target=self._produce, name="rcfast-dali-producer", daemon=True)
            self._thread.start()
            _LIVE_ENGINES.add(self)

    # ------------------------------------------------------------- producing
    def step(self):
        """Run the pipeline once: (generation, tag, tensor) of the oldest batch fed."""
        try:
            (images,) = self.pipe.run()
        except StopIteration:
            raise
        except Exception as e:
            batch = self.feed.fed[0][2] if self.feed.fed else None
            where = f" on a batch of {_describe(batch)}" if batch is not None else ""
            if isinstance(e, OSError):
                raise  # a file that vanished or cannot be read: the error names it
            raise RuntimeError(f"rcfast.data: DALI failed{where}: {e}") from e
        gen, tag, batch = self.feed.fed.popleft()
        if gen != self.feed.generation:
            return gen, tag, None  # stale: not finished, the consumer discards it
        if self.torch_resample:
            return gen, tag, self.finish(images, batch.flips)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        return gen, tag, _to_torch(images, self.device, self.dtype, stream)

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.done.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            while not self.stop.is_set():
                gen, tag, out = self.step()
                if out is not None and not self._put((gen, tag, out)):
                    return
        except StopIteration:
            return
        except BaseException as e:  # handed to the consumer, raised there
            if not self.stop.is_set():  # (after a stop, DALI's shutdown errors are expected)
                self._put((None, None, e))
        finally:
            # This thread owns the teardown: the finishing pool, then the pipeline
            # (its threads and buffers), freed here by reference counting.
            self.finish.close()
            self.pipe = None

    def receive(self):
        """The next finished (generation, tag, tensor); raises the producer's error."""
        if self._thread is None:
            return self.step()
        while True:
            try:
                item = self.done.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("rcfast.data: the DALI producer thread stopped") from self.error
        if isinstance(item[2], BaseException):
            self.error = item[2]
            raise item[2]
        return item

    def stop_soon(self) -> None:
        """Ask the engine to stop, without waiting: safe in a finalizer, in any thread.

        Finalizers can run inside a garbage collection in any thread, holding
        any lock; joining a thread there can deadlock, so the producer thread
        tears down its pipeline itself as it leaves.
        """
        if self._thread is not None:
            self.stop.set()
            self.feed.todo.put(_STOP)
        else:
            self.pipe = None

    def close(self, timeout_s: float | None = None) -> None:
        """Stop the producer thread and free the pipeline (threads, buffers) now, waiting for it
        (at most ``timeout_s`` seconds when given)."""
        self.stop_soon()
        if self._thread is not None:
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while self._thread.is_alive():
                if deadline is not None and time.monotonic() > deadline:
                    return  # still running: leave it to the interpreter (the caller asked for a bound)
                try:  # unblock a producer waiting to put
                    self.done.get(timeout=0.1)
                except queue.Empty:
                    pass
            self._thread.join()
            self._thread = None


# Engines whose producer thread may still run. A dataset dropped without close() only asks its
# producer to stop (a finalizer must not join: it can run inside a garbage collection holding any
# lock). At interpreter exit that is not enough: a daemon producer still tearing its DALI pipeline
# down while the interpreter and the C++ runtime finalise can abort the process ("terminate called
# without an active exception"). So at exit -- in the main thread, before DALI's own atexit
# shutdown, which was registered earlier and so runs later -- every live engine is closed and its
# thread joined.
_LIVE_ENGINES: "weakref.WeakSet[_Engine]" = weakref.WeakSet()


@atexit.register
def _close_engines_at_exit() -> None:
    for engine in list(_LIVE_ENGINES):
        engine.close(timeout_s=30.0)


def _to_torch(tensor_list, device: torch.device, dtype: torch.dtype, stream) -> torch.Tensor:
    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    # One copy, straight from DALI's buffer into the torch tensor.
    feed_ndarray(dense, out, cuda_stream=stream)
    return out if out.dtype == dtype else out.to(dtype)


class DaliBatches:
    """Turns plan batches into normalised NCHW tensors on `device` with one long-lived DALI pipeline.

    `plan(epoch, k)` returns batch k of an epoch (a pure function of its
    arguments); every epoch has `batches_per_epoch` batches.
    """

    def __init__(self, image_size: int, batch_size: int, num_threads: int, device: torch.device,
                 dtype: torch.dtype, mean, std, prefetch: int, plan: Callable, batches_per_epoch: int,
                 whole_box_windows: bool):
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_threads = max(1, num_threads)
        self.device = device
        self.dtype = dtype
        self.prefetch = max(1, prefetch)
        self.plan = plan
        self.batches_per_epoch = batches_per_epoch
        self.torch_resample = device.type == "cpu" and whole_box_windows
        if self.torch_resample:
            from rcfast.extras import require
            require("the DALI CPU pipeline's finishing threads", "threadpoolctl")
        self._mean = [255.0 * m for m in mean]
        self._std = [255.0 * s for s in std]
        self._mean_t = torch.tensor(self._mean, dtype=torch.float32).view(3, 1, 1)
        self._std_t = torch.tensor(self._std, dtype=torch.float32).view(3, 1, 1)
        # DALI writes float16 itself; bfloat16 is not a DALI type, so it is
        # produced from float32 on the torch side.
        self._dali_dtype = types.FLOAT16 if dtype == torch.float16 else types.FLOAT
        # Batches submitted ahead: DALI's queue, the finished queue, one in hand.
        self.lookahead = 2 * self.prefetch + 1
        self._engine: _Engine | None = None
        self._pending: collections.deque = collections.deque()  # tags submitted, not yet received
        self._next: Tag | None = None  # the tag submitted after the last one
        self._finalizer = None

    # ------------------------------------------------------------ building
    def _build(self, feed: _Feed) -> Pipeline:
        on_gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None
                     else torch.cuda.current_device()) if on_gpu else None
        decode_only = self.torch_resample
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.num_threads,
                        device_id=device_id, prefetch_queue_depth=self.prefetch)
        with pipe:
            inputs = fn.external_source(
                source=feed, num_outputs=3 if decode_only else 5, batch=True,
                dtype=[types.UINT8, types.INT32, types.INT32] + ([] if decode_only else [types.FLOAT, types.FLOAT]))
            encoded, anchor, shape = inputs[:3]
            images = fn.decoders.image_slice(
                encoded, anchor, shape, device="mixed" if on_gpu else "cpu",
                output_type=types.RGB, axis_names="WH",
                normalized_anchor=False, normalized_shape=False)
            if not decode_only:
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

    def _start(self) -> _Engine:
        finish = None
        if self.torch_resample:
            finish = _Finisher(self.image_size, self.num_threads, self.dtype, self._mean_t, self._std_t)
        engine = _Engine(self, finish)
        self._engine = engine
        self._pending.clear()
        self._next = None
        # Stops the engine when this object is dropped, and at interpreter exit
        # (before DALI's own atexit shutdown, registered earlier).
        self._finalizer = weakref.finalize(self, engine.stop_soon)
        return engine

    # ------------------------------------------------------------ iterating
    def _successor(self, tag: Tag) -> Tag:
        epoch, k = tag
        return (epoch, k + 1) if k + 1 < self.batches_per_epoch else (epoch + 1, 0)

    def _align(self, engine: _Engine, tag: Tag) -> None:
        """Make `tag` the next batch to receive, keeping the work in flight when it already is."""
        if self._pending and self._pending[0] == tag:
            return
        if not self._pending and self._next == tag:
            return
        engine.feed.generation += 1  # everything in flight is dropped
        self._pending.clear()
        self._next = tag

    def _top_up(self, engine: _Engine) -> None:
        gen = engine.feed.generation
        while len(self._pending) < self.lookahead:
            tag = self._next
            engine.feed.todo.put((gen, tag, self.plan(*tag)))
            self._pending.append(tag)
            self._next = self._successor(tag)

    def iterate(self, epoch: int, start: int):
        """Yield batches `start`, `start + 1`, ... of `epoch` as normalised tensors."""
        if start >= self.batches_per_epoch:
            return
        engine = self._engine if self._engine is not None else self._start()
        self._align(engine, (epoch, start))
        try:
            for k in range(start, self.batches_per_epoch):
                self._top_up(engine)
                while True:
                    gen, tag, images = engine.receive()
                    if gen == engine.feed.generation and images is not None:
                        break
                expected = self._pending.popleft()
                if not tag == expected == (epoch, k):
                    raise RuntimeError(f"rcfast.data: got batch {tag} where {(epoch, k)} was due: two "
                                       "iterators over one ProxyImages were interleaved")
                yield images
        except BaseException as e:
            if not isinstance(e, GeneratorExit):
                # A failed pipeline is not reused: the next iteration builds a new one.
                self.close()
            raise

    def close(self) -> None:
        """Stop the pipeline's threads and free it, now; a later iteration builds a new one."""
        if self._engine is not None:
            self._finalizer.detach()
            self._engine.close()
        self._engine, self._finalizer = None, None
        self._pending.clear()
        self._next = None


class _Finisher:
    """CPU finishing: decoded boxes (uint8 HWC) -> resized, flipped, normalised NCHW batch.

    Images are finished one by one, each entirely in cache (resize, flip,
    convert, normalise), split over `num_threads` pool threads: torch releases
    the GIL, so they run in parallel with each other and with DALI.
    """

    def __init__(self, image_size: int, num_threads: int, dtype: torch.dtype, mean: torch.Tensor,
                 std: torch.Tensor):
        self.image_size = image_size
        self.num_threads = num_threads
        self.dtype = dtype
        self.mean, self.std = mean, std
        self.pool = ThreadPoolExecutor(num_threads, thread_name_prefix="rcfast-dali-finish",
                                       initializer=_OpenMPLimit())

    def __call__(self, slices, flips) -> torch.Tensor:
        n, size = len(slices), self.image_size
        out = torch.empty((n, 3, size, size), dtype=torch.float32)
        mean, std = self.mean, self.std

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

        chunks = np.linspace(0, n, self.num_threads + 1).astype(int)
        futures = [self.pool.submit(finish, lo, hi) for lo, hi in zip(chunks[:-1], chunks[1:]) if hi > lo]
        for f in futures:
            f.result()
        return out if self.dtype == torch.float32 else out.to(self.dtype)

    def close(self) -> None:
        self.pool.shutdown(wait=True)  # called by the producer thread, the pool's only client
