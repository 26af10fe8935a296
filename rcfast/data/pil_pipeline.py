"""The PIL backend: PIL decode + crop/resize/flip in `torch.utils.data.DataLoader` workers.

Used when DALI is not importable or when asked for (`backend="pil"`). It runs
the same plan as the DALI backend (`rcfast.data.plan`): for each image, decode,
cut the integer box around its window, resize exactly the window to S x S with
PIL's antialiased bilinear filter (what torchvision's RandomResizedCrop does
on PIL images), flip. Workers return uint8 HWC arrays; the main process
normalises on the target device, which moves 4x fewer bytes between processes
(and over PCIe) than float tensors would.

Worker processes (`num_threads > 0`) are forked, through a private `fork`
multiprocessing context handed to the DataLoader (the process-wide start method
and forkserver settings are never touched), so they work wherever torch's own
DataLoader does on Linux: in a script without an `if __name__ == "__main__":`
guard, in `python - < script.py`, in a notebook. Two hazards of forking are
handled explicitly:

- objects inherited from the parent are never finalised in a worker. A DALI
  pipeline that is garbage but not yet collected when the worker is forked
  would otherwise be destroyed by the worker's garbage collector, and DALI's
  destructor waits forever for executor threads that do not exist in the
  child (a deadlock seen in the test suite). The parent's collector is
  paused for the instant of the fork (and restored), and each worker first
  moves everything it inherited into the collector's permanent generation
  (`gc.freeze()`).
- a worker never outlives its parent: on Linux it asks the kernel for SIGKILL
  when the parent dies (`prctl(PR_SET_PDEATHSIG)`), so a SIGKILL or SIGTERM of
  the training process leaves no worker behind. The signal follows the parent
  *thread*, so it is requested only when the iterator is started from the
  main thread; otherwise DataLoader's own watchdog ends orphaned workers
  within five seconds.

Other platforms use multiprocessing's default start method there (spawn),
with its usual `if __name__ == "__main__":` rule, as DataLoader does.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal
import sys
import threading
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

_EXIF_ORIENTATION = 0x0112
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB as DALI's decoders produce it (alpha dropped, 16-bit scaled, not clipped)."""
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT_GREY:
        # PIL's convert() clips 16-bit grey at 255 (almost white); DALI
        # scales it: round(v / 257), i.e. 65535 -> 255.
        grey = np.asarray(im).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((grey + 128) // 257).astype(np.uint8), mode="L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        # Palette images with transparency go through RGBA, as PIL advises;
        # alpha is dropped (not composited), like DALI's RGB decode.
        im = im.convert("RGBA")
    return im.convert("RGB")


def load_window(path: str, box, window, flip: bool, image_size: int) -> np.ndarray:
    """One augmented image as a uint8 `[S, S, 3]` array.

    `box` is the integer (x0, y0, x1, y1) region to decode, `window` the float
    region to resample, relative to the box's origin.
    """
    with Image.open(path) as im:
        if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            im = ImageOps.exif_transpose(im)  # DALI applies EXIF orientation too
        im = _to_rgb(im.crop(tuple(int(v) for v in box)))
        im = im.resize((image_size, image_size), Image.Resampling.BILINEAR,
                       box=tuple(float(v) for v in window))
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(im)


@dataclass(frozen=True)
class SampleSpec:
    """What a worker needs to produce one image (picklable, a few bytes)."""

    path: str
    box: tuple
    window: tuple
    flip: bool


class _WindowDataset(torch.utils.data.Dataset):
    """Map-style dataset whose 'index' is a SampleSpec (fed by the batch plan)."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __getitem__(self, spec: SampleSpec) -> np.ndarray:
        return load_window(spec.path, spec.box, spec.window, spec.flip, self.image_size)

    def __len__(self):  # only the batch sampler indexes this dataset
        raise TypeError("_WindowDataset has no length: it is indexed by SampleSpec")


class _BatchPlan(torch.utils.data.Sampler):
    """Batch sampler over the current epoch's remaining batches of SampleSpecs.

    Lives in the main process (persistent workers only receive the specs), so
    replacing `batches` before each epoch is all it takes to start a new one.
    `batches` may be a generator: batches are planned as the loader asks.
    """

    def __init__(self):
        self.batches = iter(())
        self.count = 0

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return self.count


def _set_parent_death_signal(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent thread dies."""
    libc = ctypes.CDLL(None, use_errno=True)  # the C library this process already runs on
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


class _WorkerStart:
    """`worker_init_fn`: runs first in every worker (see the module docstring).

    Its fields are set in the parent just before the workers fork, and forked
    into each of them.
    """

    def __init__(self):
        self.parent_pid = os.getpid()
        self.gc_was_enabled = True
        self.die_with_parent = False

    def __call__(self, worker_id: int) -> None:
        gc.freeze()  # inherited objects (DALI pipelines among them) are never finalised here
        if self.gc_was_enabled:
            gc.enable()
        if self.die_with_parent:
            _set_parent_death_signal(self.parent_pid)


def _worker_context():
    """A private start-method context for the workers (None: DataLoader's default)."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return None


def _specs(plan, epoch: int, start: int, stop: int):
    """SampleSpecs of batches start..stop-1 of `epoch`, planned as the loader asks for them.

    A module-level generator: it holds the planner, not the backend object,
    so nothing forms a reference cycle that only the garbage collector frees.
    """
    for k in range(start, stop):
        b = plan(epoch, k)
        yield [SampleSpec(p, tuple(box), tuple(win), bool(flip))
               for p, box, win, flip in zip(b.paths, b.boxes.tolist(), b.windows.tolist(), b.flips.tolist())]


def _join_feeder_threads(queues, timeout: float = 5.0) -> None:
    """Wait for the feeder threads of closed multiprocessing queues to end.

    DataLoader's shutdown closes its queues but cancels the join of their
    feeder threads (a thread writing to a dead worker's full pipe would block
    forever), so each exits on its own a moment later. Joining them here keeps
    `close()` from returning while a thread of ours still runs in the caller's
    process. The feeders only flush a few bytes of indices; the timeout bounds
    the wait if one is stuck anyway (such a thread is a daemon and never blocks
    exit).
    """
    for q in queues:
        feeder = getattr(q, "_thread", None)  # started on the queue's first put()
        if feeder is not None and feeder is not threading.current_thread():
            feeder.join(timeout)


def _stack(samples: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(samples))


class PilBatches:
    """Turns plan batches into normalised NCHW tensors on `device`.

    `plan(epoch, k)` returns batch k of an epoch; every epoch has
    `batches_per_epoch` batches.
    """

    def __init__(self, image_size: int, num_workers: int, device: torch.device,
                 dtype: torch.dtype, mean, std, prefetch: int, plan, batches_per_epoch: int):
        self.image_size = image_size
        self.device = device
        self.dtype = dtype
        self.num_workers = num_workers
        self.prefetch = max(1, prefetch)
        self.plan = plan
        self.batches_per_epoch = batches_per_epoch
        # On the 0-255 scale of the uint8 pixels, as DALI's crop_mirror_normalize.
        self._mean = (255.0 * torch.tensor(mean, dtype=torch.float32, device=device)).view(1, 3, 1, 1)
        self._std = (255.0 * torch.tensor(std, dtype=torch.float32, device=device)).view(1, 3, 1, 1)
        self._batch_plan = _BatchPlan()
        self._worker_start = _WorkerStart()
        self._loader = None

    def _make_loader(self) -> torch.utils.data.DataLoader:
        extra = {}
        if self.num_workers > 0:
            # Persistent workers: one fork per dataset, not one per epoch.
            extra = dict(persistent_workers=True, prefetch_factor=self.prefetch,
                         multiprocessing_context=_worker_context(), worker_init_fn=self._worker_start)
        # All randomness comes from the plan; the loader's own generator only
        # seeds workers, and a private one keeps it from drawing on the global
        # torch RNG whenever an iterator starts (which would shift a resumed
        # run's RNG stream against an uninterrupted one).
        return torch.utils.data.DataLoader(
            _WindowDataset(self.image_size), batch_sampler=self._batch_plan, num_workers=self.num_workers,
            collate_fn=_stack, pin_memory=self.device.type == "cuda", generator=torch.Generator(), **extra)

    def _start_iterator(self):
        """iter() of the loader; when that forks workers, the parent's collector pauses for it."""
        start = self._worker_start
        start.parent_pid = os.getpid()
        start.gc_was_enabled = gc.isenabled()
        start.die_with_parent = threading.current_thread() is threading.main_thread()
        gc.disable()
        try:
            return iter(self._loader)
        finally:
            if start.gc_was_enabled:
                gc.enable()

    def iterate(self, epoch: int, start: int):
        """Yield batches `start`, `start + 1`, ... of `epoch` as normalised tensors."""
        if start >= self.batches_per_epoch:
            return
        if self._loader is None:
            self._loader = self._make_loader()
        self._batch_plan.batches = _specs(self.plan, epoch, start, self.batches_per_epoch)
        self._batch_plan.count = self.batches_per_epoch - start
        for uint8_nhwc in self._start_iterator():
            yield self._normalize(uint8_nhwc)

    def close(self) -> None:
        """Shut the worker processes down and wait for them; a later iteration starts new ones."""
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None)  # the persistent workers' iterator, if started
        if iterator is not None:
            # Explicitly, not through the iterator's finaliser: a suspended
            # generator elsewhere may still hold the iterator.
            iterator._shutdown_workers()
            _join_feeder_threads([*iterator._index_queues, iterator._worker_result_queue])

    def _normalize(self, uint8_nhwc: torch.Tensor) -> torch.Tensor:
        x = uint8_nhwc.to(self.device, non_blocking=True)
        n, s = x.shape[0], self.image_size
        out = torch.empty((n, 3, s, s), dtype=torch.float32, device=self.device)
        out.copy_(x.permute(0, 3, 1, 2))
        out.sub_(self._mean).div_(self._std)
        return out if self.dtype == torch.float32 else out.to(self.dtype)
