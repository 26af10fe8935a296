"""`ProxyImages`: the iterable of normalised image batches that distillation consumes.

It owns argument checking, backend choice (DALI, else PIL with one warning),
shard defaults from torch.distributed, the epoch/position state that makes
training resumable, and the assembly of plan batches (`rcfast.data.plan`) that
both backends execute.
"""

from __future__ import annotations

import os
import warnings
import numpy as np
import torch

from PIL import Image

from . import plan
from .sources import DALI_FORMATS, DEFAULT_MAX_PIXELS, links_warning, scan, skipped_warning

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_BACKENDS = ("auto", "dali", "pil")


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_max_pixels(value) -> int:
    value = _check_positive_int("max_pixels", value)
    pil_limit = Image.MAX_IMAGE_PIXELS  # PIL's own (global) limit: PIL refuses above twice it
    if pil_limit is not None and value > 2 * pil_limit:
        raise ValueError(f"max_pixels={value} is above what PIL opens (2 x PIL.Image.MAX_IMAGE_PIXELS = "
                         f"{2 * pil_limit}); raise PIL.Image.MAX_IMAGE_PIXELS as well to allow such images")
    return value


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")


def _resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu' or a CUDA device, got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or a CUDA device, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _default_shards(shard_id, num_shards):
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    num_shards = world if num_shards is None else _check_positive_int("num_shards", num_shards)
    shard_id = rank if shard_id is None else shard_id
    if isinstance(shard_id, bool) or not isinstance(shard_id, (int, np.integer)) or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be an integer in [0, num_shards={num_shards}), got {shard_id!r}")
    return int(shard_id), num_shards


class ProxyImages:
    """Batches of normalised images `[N, 3, S, S]` from a folder or a list file.

    Args:
        source: a folder of images (searched recursively; with `labels=True` its
            first-level sub-folders are the classes, sorted by name) or a text
            file with one image path per line, optionally followed by an integer
            label (relative paths are resolved against the file's folder).
        image_size: output side S.
        batch_size: images per batch (the last batch of an epoch may be smaller
            unless `drop_last`).
        device: where batches are delivered: "auto" (the current CUDA device if
            any, else CPU), "cpu", "cuda" or "cuda:N". With DALI on a GPU the
            decode itself runs there (nvJPEG, `device="mixed"`).
        shard_id, num_shards: this process's part of each epoch; default to the
            torch.distributed rank and world size when it is initialised, else
            0 and 1.
        seed: the epoch orders and augmentations are a function of (seed, epoch).
        augment: "rrc_flip" (RandomResizedCrop scale (0.08, 1), ratio (3/4, 4/3),
            then horizontal flip with p = 0.5: training), "center" (shorter side
            to round(S * 256 / 224), centre crop S: evaluation), or "none"/None
            (the whole image squashed to S x S).
        labels: also yield int64 labels (`(images, labels)` per batch).
        drop_last: drop each shard's last partial batch, and give every shard
            floor(N / num_shards) images so all ranks run the same number of
            batches (use it for DDP training). With False every image is
            delivered exactly once per epoch across the shards, whose sizes then
            differ by at most one image (use it for evaluation).
        dtype: torch.float32, torch.float16 or torch.bfloat16.
        backend: "auto" (DALI when importable and able to decode every image,
            else PIL with one warning saying why), "dali" or "pil".
        num_threads: DALI decoding threads (and, on a CPU, as many threads
            finishing the resize/normalise in torch; 0 counts as 1), or PIL
            DataLoader worker processes (0 loads in the main process). PIL
            workers are forked through a private context (no `__main__`
            guard needed on Linux) and die with the process that started
            them.
        shuffle: reshuffle every epoch; default True for "rrc_flip", False
            otherwise.
        prefetch: batches prepared ahead (DALI prefetch queue depth, DataLoader
            prefetch factor).
        max_pixels: images whose header shows more pixels (width x height) are
            skipped without being decoded, by either backend (decompression
            bombs); default 89,478,485, PIL's own default limit.
        skip_damaged_jpegs: skip JPEGs whose entropy-coded data libjpeg
            reports as damaged ("Corrupt JPEG data: ..."), which PIL and DALI
            would decode silently into partly grey or garbled images. The
            check is part of the one-time image check (a 1/8-scale libjpeg
            decode, cheaper than the PIL decode it replaced); False keeps
            them.

    Iterating yields one epoch, continuing from the current position (see
    `state_dict`); finishing an epoch advances `epoch` by one. Batches depend
    only on (seed, epoch, shard settings), bitwise, for each backend; the DALI
    and PIL backends agree to about one grey level. Unreadable, damaged and
    oversized files are found once (cached), reported in one warning with their
    reasons and skipped. Symbolic links are followed, each real folder once.

    Resume: save `state_dict()` with the checkpoint (it counts the batches
    handed out, including the one being trained on), and after
    `load_state_dict(state)` the next iteration yields exactly the remaining
    batches of that epoch, without reading the skipped ones.

    Resources: the DALI backend keeps one pipeline (and its threads) from the
    first iteration until `close()` or until the object is dropped; the PIL
    backend keeps its worker processes the same way. One iterator at a time:
    starting a new one abandons the previous one.
    """

    def __init__(self, source, image_size: int = 224, batch_size: int = 64, device="auto",
                 shard_id: int | None = None, num_shards: int | None = None, seed: int = 0,
                 augment: str | None = "rrc_flip", labels: bool = False, drop_last: bool = False,
                 dtype=torch.float32, backend: str = "auto", num_threads: int = 2,
                 shuffle: bool | None = None, prefetch: int = 2, max_pixels: int = DEFAULT_MAX_PIXELS,
                 skip_damaged_jpegs: bool = True):
        if source is None or not isinstance(source, (str, os.PathLike)):
            raise ValueError(f"source must be a folder or a list-file path, got {source!r}")
        self.image_size = _check_positive_int("image_size", image_size)
        self.batch_size = _check_positive_int("batch_size", batch_size)
        augment = "none" if augment is None else augment
        if augment not in plan.AUGMENTS:
            raise ValueError(f"augment must be one of {plan.AUGMENTS} or None, got {augment!r}")
        self.augment = augment
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.dtype = _resolve_dtype(dtype)
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
            raise ValueError(f"num_threads must be an integer >= 0, got {num_threads!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.seed = int(seed)
        self.device = _resolve_device(device)
        self.shard_id, self.num_shards = _default_shards(shard_id, num_shards)
        self.labels = _check_bool("labels", labels)
        self.drop_last = _check_bool("drop_last", drop_last)
        self.shuffle = (augment == "rrc_flip") if shuffle is None else _check_bool("shuffle", shuffle)
        self.prefetch = _check_positive_int("prefetch", prefetch)
        self.max_pixels = _check_max_pixels(max_pixels)
        self.skip_damaged_jpegs = _check_bool("skip_damaged_jpegs", skip_damaged_jpegs)

        self._images = scan(source, labels=self.labels, num_threads=max(1, num_threads),
                            max_pixels=self.max_pixels, skip_damaged_jpegs=self.skip_damaged_jpegs)
        if self._images.links_not_followed:
            warnings.warn(links_warning(self._images), RuntimeWarning, stacklevel=2)
        if self._images.skipped:
            warnings.warn(skipped_warning(self._images), RuntimeWarning, stacklevel=2)
        self.source = self._images.source
        self.classes = self._images.classes
        self._widths = np.asarray(self._images.widths, dtype=np.int64)
        self._heights = np.asarray(self._images.heights, dtype=np.int64)
        self._labels = (np.asarray(self._images.labels, dtype=np.int64)
                        if self._images.labels is not None else None)

        self._planner = plan.EpochPlanner(
            self._images.paths, self._widths, self._heights, image_size=self.image_size,
            batch_size=self.batch_size, seed=self.seed, augment=self.augment, shuffle=self.shuffle,
            shard_id=self.shard_id, num_shards=self.num_shards, drop_last=self.drop_last)
        if len(self) == 0:
            raise ValueError(
                f"shard {self.shard_id} of num_shards={self.num_shards} gets {self.num_images} of the source's "
                f"{self.total_images} images, which make no batch of batch_size={self.batch_size}"
                + (" with drop_last=True" if self.drop_last else "")
                + ": use a smaller batch_size or fewer shards")

        self.backend = self._resolve_backend(backend)
        if self.backend == "dali":
            from .dali_pipeline import DaliBatches
            self._runner = DaliBatches(self.image_size, self.batch_size, num_threads, self.device,
                                       self.dtype, IMAGENET_MEAN, IMAGENET_STD, self.prefetch,
                                       plan=self._planner, batches_per_epoch=len(self),
                                       whole_box_windows=self.augment in ("rrc_flip", "none"))
        else:
            from .pil_pipeline import PilBatches
            self._runner = PilBatches(self.image_size, num_threads, self.device, self.dtype,
                                      IMAGENET_MEAN, IMAGENET_STD, self.prefetch,
                                      plan=self._planner, batches_per_epoch=len(self))
        self._epoch = 0
        self._position = 0  # batches of the current epoch already handed out

    # ----------------------------------------------------------------- sizes
    @property
    def total_images(self) -> int:
        """Readable images in the source (all shards)."""
        return len(self._images.paths)

    @property
    def num_images(self) -> int:
        """Images this shard delivers per epoch (before dropping a partial batch)."""
        return self._planner.num_images

    @property
    def num_classes(self) -> int | None:
        """Number of classes (folder sources), or max label + 1 (list files); None without labels."""
        if self._labels is None:
            return None
        return len(self.classes) if self.classes is not None else int(self._labels.max()) + 1

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of the source's files that are not readable images."""
        return list(self._images.skipped)

    def __len__(self) -> int:
        """Batches per epoch for this shard."""
        return self._planner.num_batches

    # ----------------------------------------------------------------- state
    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate next. Changing it restarts at its first
        batch; setting the current epoch again keeps the position (so calling
        it after `load_state_dict` does not lose the resume point)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        if int(epoch) != self._epoch:
            self._epoch, self._position = int(epoch), 0

    def state_dict(self) -> dict:
        """Epoch and batches already handed out in it, plus what must match on resume."""
        return {"epoch": self._epoch, "batches_consumed": self._position, "seed": self.seed,
                "total_images": self.total_images, "batch_size": self.batch_size,
                "num_shards": self.num_shards, "shard_id": self.shard_id,
                "shuffle": self.shuffle, "augment": self.augment, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration starts at batch `batches_consumed` of `epoch`.

        Raises ValueError when the saved data settings differ from this
        dataset's, since the remaining batches would then not be the same.
        """
        for key in ("seed", "total_images", "batch_size", "num_shards", "shard_id",
                    "shuffle", "augment", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"state_dict was saved with {key}={state[key]!r} but this dataset has "
                                 f"{key}={getattr(self, key)!r}: the resumed batches would differ")
        if not isinstance(state, dict):
            raise ValueError(f"state_dict must be a dict, got {type(state).__name__}")
        for key in ("epoch", "batches_consumed"):
            if key not in state:
                raise ValueError(f"state_dict has no {key!r}: not a ProxyImages state")
            if isinstance(state[key], bool) or not isinstance(state[key], (int, np.integer)):
                raise ValueError(f"state_dict[{key!r}] must be an integer, got {state[key]!r}")
        epoch, position = int(state["epoch"]), int(state["batches_consumed"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise ValueError(f"state_dict position out of range: epoch={epoch}, "
                             f"batches_consumed={position} (epoch has {len(self)} batches)")
        self._epoch, self._position = epoch, position

    # ------------------------------------------------------------- iteration
    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Global image indices this shard delivers in `epoch`, in order (read-only)."""
        return self._planner.epoch_indices(epoch)

    def __iter__(self):
        epoch, start = self._epoch, self._position
        for k, images in enumerate(self._runner.iterate(epoch, start), start=start):
            # Counted before the yield: while the caller holds batch k, the
            # state says k + 1 consumed, which is where a resume must start.
            self._position = k + 1
            if self._labels is None:
                yield images
            else:
                labels = torch.from_numpy(self._labels[self._planner.batch_indices(epoch, k)])
                yield images, labels.to(self.device, non_blocking=True)
        self._epoch, self._position = epoch + 1, 0

    def close(self) -> None:
        """Release the backend's pipeline threads or worker processes now.

        Also happens when the object is dropped; a later iteration starts them
        again.
        """
        self._runner.close()

    def __enter__(self) -> "ProxyImages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ProxyImages(source={str(self.source)!r}, images={self.num_images}/{self.total_images}, "
                f"shard={self.shard_id}/{self.num_shards}, batch_size={self.batch_size}, "
                f"image_size={self.image_size}, augment={self.augment!r}, backend={self.backend!r}, "
                f"device={str(self.device)!r}, epoch={self._epoch}, position={self._position})")

    def _resolve_backend(self, backend: str) -> str:
        if backend == "pil":
            return "pil"
        reason = None
        try:
            import nvidia.dali  # noqa: F401
            from . import dali_pipeline  # noqa: F401  (also imports DALI's torch plugin)
        except ImportError as e:
            reason = f"NVIDIA DALI is not importable ({e})"
        if reason is None:
            unsupported = sorted(set(self._images.formats) - DALI_FORMATS)
            if unsupported:
                reason = f"DALI cannot decode the source's {', '.join(unsupported)} images"
        if reason is None:
            return "dali"
        if backend == "dali":
            raise ValueError(f"backend='dali' is not usable here: {reason}")
        warnings.warn(f"rcfast.data: {reason}; using the PIL backend (backend='pil')",
                      RuntimeWarning, stacklevel=3)
        return "pil"
