"""The PIL backend: PIL decode + crop/resize/flip in `torch.utils.data.DataLoader` workers.

Used when DALI is not importable or when asked for (`backend="pil"`). It runs
the same plan as the DALI backend (`rcfast.data.plan`): for each image, decode,
cut the integer box around its window, resize exactly the window to S x S with
PIL's antialiased bilinear filter (what torchvision's RandomResizedCrop does
on PIL images), flip. Workers return uint8 HWC arrays; the main process
normalises on the target device, which moves 4x fewer bytes between processes
(and over PCIe) than float tensors would.

Workers start from a fork server that has imported this module, not by forking
the caller: a process that also runs DALI pipelines (or any threads holding
locks) cannot pass a held lock to a worker, which with plain fork deadlocks
the worker. As with any non-fork start method, a script that iterates
`ProxyImages` with workers must keep its top-level code under
`if __name__ == "__main__":`.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

_EXIF_ORIENTATION = 0x0112


def load_window(path: str, box, window, flip: bool, image_size: int) -> np.ndarray:
    """One augmented image as a uint8 `[S, S, 3]` array.

    `box` is the integer (x0, y0, x1, y1) region to decode, `window` the float
    region to resample, relative to the box's origin.
    """
    with Image.open(path) as im:
        if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            im = ImageOps.exif_transpose(im)  # DALI applies EXIF orientation too
        im = im.crop(tuple(int(v) for v in box))
        if im.mode != "RGB":
            # Palette images with transparency go through RGBA, as PIL advises;
            # alpha is dropped (not composited), like DALI's RGB decode.
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            im = im.convert("RGB")
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
    """

    def __init__(self):
        self.batches: list[list[SampleSpec]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _worker_context():
    ctx = multiprocessing.get_context("forkserver")
    # The server imports torch, PIL and this module once; each worker is then
    # a cheap fork of that clean, single-threaded process.
    ctx.set_forkserver_preload([__name__])
    return ctx


def _stack(samples: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(samples))


class PilBatches:
    """Turns plan batches into normalised NCHW tensors on `device`."""

    def __init__(self, image_size: int, num_workers: int, device: torch.device,
                 dtype: torch.dtype, mean, std, prefetch: int = 2):
        self.image_size = image_size
        self.device = device
        self.dtype = dtype
        self._plan = _BatchPlan()
        # On the 0-255 scale of the uint8 pixels, as DALI's crop_mirror_normalize.
        self._mean = (255.0 * torch.tensor(mean, dtype=torch.float32, device=device)).view(1, 3, 1, 1)
        self._std = (255.0 * torch.tensor(std, dtype=torch.float32, device=device)).view(1, 3, 1, 1)
        extra = {}
        if num_workers > 0:
            # Persistent workers: one fork per dataset, not one per epoch.
            extra = dict(persistent_workers=True, prefetch_factor=max(1, prefetch),
                         multiprocessing_context=_worker_context())
        # All randomness comes from the plan; the loader's own generator only
        # seeds workers, and a private one keeps it from drawing on the global
        # torch RNG whenever an iterator starts (which would shift a resumed
        # run's RNG stream against an uninterrupted one).
        self._loader = torch.utils.data.DataLoader(
            _WindowDataset(image_size), batch_sampler=self._plan, num_workers=num_workers,
            collate_fn=_stack, pin_memory=device.type == "cuda", generator=torch.Generator(), **extra)

    def iterate(self, batches):
        """Yield one normalised image tensor per plan batch, in order."""
        self._plan.batches = [
            [SampleSpec(p, tuple(box), tuple(win), bool(flip))
             for p, box, win, flip in zip(b.paths, b.boxes.tolist(), b.windows.tolist(), b.flips.tolist())]
            for b in batches]
        for uint8_nhwc in self._loader:
            yield self._normalize(uint8_nhwc)

    def _normalize(self, uint8_nhwc: torch.Tensor) -> torch.Tensor:
        x = uint8_nhwc.to(self.device, non_blocking=True)
        n, s = x.shape[0], self.image_size
        out = torch.empty((n, 3, s, s), dtype=torch.float32, device=self.device)
        out.copy_(x.permute(0, 3, 1, 2))
        out.sub_(self._mean).div_(self._std)
        return out if self.dtype == torch.float32 else out.to(self.dtype)
