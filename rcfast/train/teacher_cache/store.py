"""The teacher cache on disk: where each (epoch, sample) lives, atomic chunk files, checks, memory-mapped reads.

A cache directory holds ``manifest.json`` (:mod:`rcfast.train.teacher_cache.manifest`)
and, per epoch, chunk files of rows, one row per sample: a dense cache's row
is the packed logits of all teachers (``W = sum(C_t)``, no indices); a top-k
cache's row is ``T x k`` values and as many class indices (``W = T * k``), or
``T x (k + 1)`` with the tail mass (each teacher's last entry is its fill, index -1)::

    DIR/manifest.json
    DIR/epoch_00003/shard_0001_chunk_00002.bin    values [rows, W], then indices [rows, W] (top-k only)
    DIR/epoch_00003/shard_0001_chunk_00002.json   its record: rows, bytes, sha256

**Where a sample is.** The cache was built by iterating each build shard ``s``
of ``S`` the way a run does (``ProxyImages(shard_id=s, num_shards=S,
drop_last=False)``): shard ``s`` delivers the epoch order's positions ``s, s + S,
s + 2S, ...``, so its ``p``-th row is position ``s + p*S`` of
``epoch_order(N, seed, epoch, shuffle)`` (:mod:`rcfast.data.plan`), and every
image of the epoch is there exactly once. Global image ``i`` is found by
inverting that permutation: ``pos = inverse[i]``, ``s = pos % S``,
``p = pos // S``, chunk ``p // R``, row ``p % R`` (``R`` rows per chunk, a
whole number of batches). A run with any batch size or number of ranks finds
its samples; one with the build's batch size and ranks reads contiguous rows
of its own shard's files.

**Writes** go to a temporary file in the same folder, are fsync'ed and renamed
over the final name (then the folder is fsync'ed); the record is written the
same way *after* its data file, and removed *before* a data file is rewritten.
A chunk counts only when its record exists and its data file has the record's
size and sha256, so a killed writer never leaves a chunk that a run would read.

**Reads** check every chunk a run needs for existence and size before
training (:meth:`TeacherCacheFiles.check_epochs`), and each chunk's sha256 the
first time it is read (a corrupt chunk is an error naming the file). All files
are raw little-endian arrays and JSON: data only, nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from rcfast.data.plan import epoch_order
from rcfast.atomic import atomic_file

__all__ = ["CacheError", "Layout", "VALUE_DTYPES", "INDEX_DTYPES", "atomic_write", "write_chunk",
           "chunk_problem", "TeacherCacheFiles", "sha256_file", "values_to_torch"]

# Storage dtype name -> (numpy dtype on disk, torch dtype it is read as). bf16 has
# no numpy dtype: its bit pattern is stored as uint16 and viewed back in torch.
VALUE_DTYPES = {"fp32": ("<f4", torch.float32), "fp16": ("<f2", torch.float16), "bf16": ("<u2", torch.bfloat16)}
INDEX_DTYPES = {"int16": "<i2", "int32": "<i4"}
_RECORD_FORMAT = "rcfast.teacher_cache.chunk/1"
_HASH_BLOCK = 16 << 20


class CacheError(ValueError):
    """A teacher cache cannot be used: missing, truncated or corrupt file, or a manifest that does not fit."""


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CacheError(f"{what} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class Layout:
    """The geometry of a cache: how many rows each (epoch, shard, chunk) file holds, and where a sample is.

    ``num_images`` N (rows per epoch), ``num_shards`` S and ``batch_size`` B of
    the build, ``chunk_batches`` (R = chunk_batches x B rows per chunk),
    ``row_width`` W (values per row), the storage dtypes (``index_dtype`` is
    ``None`` for a dense cache, whose rows are the packed logits in class
    order), and the epoch order's ``seed`` and ``shuffle``.
    """

    num_images: int
    num_shards: int
    batch_size: int
    chunk_batches: int
    row_width: int
    value_dtype: str
    index_dtype: str | None
    seed: int
    shuffle: bool

    def __post_init__(self) -> None:
        for name in ("num_images", "num_shards", "batch_size", "chunk_batches", "row_width"):
            _positive_int(getattr(self, name), f"layout.{name}")
        if self.value_dtype not in VALUE_DTYPES:
            raise CacheError(f"layout.value_dtype must be one of {list(VALUE_DTYPES)}, got {self.value_dtype!r}")
        if self.index_dtype is not None and self.index_dtype not in INDEX_DTYPES:
            raise CacheError(f"layout.index_dtype must be one of {list(INDEX_DTYPES)} or null, got "
                             f"{self.index_dtype!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise CacheError(f"layout.seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.shuffle, bool):
            raise CacheError(f"layout.shuffle must be true or false, got {self.shuffle!r}")
        if self.num_shards > self.num_images:
            raise CacheError(f"layout.num_shards={self.num_shards} exceeds num_images={self.num_images}")

    @classmethod
    def from_dict(cls, data) -> "Layout":
        if not isinstance(data, dict):
            raise CacheError(f"manifest layout must be a mapping, got {type(data).__name__}")
        names = set(cls.__dataclass_fields__)
        if set(data) != names:
            raise CacheError(f"manifest layout must have exactly the keys {sorted(names)}, got {sorted(data)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    # -- sizes
    @property
    def rows_per_chunk(self) -> int:
        return self.chunk_batches * self.batch_size

    @property
    def value_bytes(self) -> int:
        return np.dtype(VALUE_DTYPES[self.value_dtype][0]).itemsize

    @property
    def index_bytes(self) -> int:
        return 0 if self.index_dtype is None else np.dtype(INDEX_DTYPES[self.index_dtype]).itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes per (epoch, sample): W values, plus W indices for a top-k cache."""
        return self.row_width * (self.value_bytes + self.index_bytes)

    def shard_rows(self, shard: int) -> int:
        return self.num_images // self.num_shards + (1 if shard < self.num_images % self.num_shards else 0)

    def num_chunks(self, shard: int) -> int:
        return math.ceil(self.shard_rows(shard) / self.rows_per_chunk)

    def chunk_rows(self, shard: int, chunk: int) -> int:
        return min(self.rows_per_chunk, self.shard_rows(shard) - chunk * self.rows_per_chunk)

    def chunk_bytes(self, shard: int, chunk: int) -> int:
        return self.chunk_rows(shard, chunk) * self.row_bytes

    def chunks(self, epoch: int):
        """``(shard, chunk)`` of every chunk of an epoch."""
        return [(s, c) for s in range(self.num_shards) for c in range(self.num_chunks(s))]

    # -- names
    @staticmethod
    def chunk_path(root: Path, epoch: int, shard: int, chunk: int) -> Path:
        return Path(root) / f"epoch_{epoch:05d}" / f"shard_{shard:04d}_chunk_{chunk:05d}.bin"

    @staticmethod
    def record_path(data_path: Path) -> Path:
        return data_path.with_suffix(".json")

    # -- where samples are
    def inverse_order(self, epoch: int) -> np.ndarray:
        """``inverse[i]``: the position of global image ``i`` in the epoch's order."""
        order = epoch_order(self.num_images, self.seed, epoch, self.shuffle)
        inverse = np.empty(self.num_images, dtype=np.int64)
        inverse[order] = np.arange(self.num_images, dtype=np.int64)
        return inverse

    def locate(self, inverse: np.ndarray, samples: np.ndarray):
        """``(shard, chunk, row)`` arrays of global image indices ``samples`` (given the epoch's inverse order)."""
        samples = np.asarray(samples, dtype=np.int64)
        if samples.size and (samples.min() < 0 or samples.max() >= self.num_images):
            raise CacheError(f"sample index out of range [0, {self.num_images}) of the cache")
        position = inverse[samples]
        shard, within = position % self.num_shards, position // self.num_shards
        return shard, within // self.rows_per_chunk, within % self.rows_per_chunk


def atomic_write(path: Path, blocks) -> None:
    """Write the byte strings ``blocks`` to ``path`` atomically (:func:`rcfast.atomic.atomic_file`)."""
    with atomic_file(path) as f:
        for block in blocks:
            f.write(block)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def write_chunk(root: Path, layout: Layout, epoch: int, shard: int, chunk: int, values: np.ndarray,
                indices: np.ndarray | None) -> Path:
    """Write one chunk (``values``/``indices`` ``[rows, W]`` in the storage dtypes) and then its record."""
    rows = layout.chunk_rows(shard, chunk)
    shape = (rows, layout.row_width)
    if values.shape != shape or values.dtype != np.dtype(VALUE_DTYPES[layout.value_dtype][0]):
        raise ValueError(f"chunk values must be {shape} {layout.value_dtype}, got {values.shape} {values.dtype}")
    if (indices is None) != (layout.index_dtype is None) or (
            indices is not None and (indices.shape != shape or indices.dtype != np.dtype(INDEX_DTYPES[layout.index_dtype]))):
        raise ValueError(f"chunk indices must be {shape} {layout.index_dtype}, got "
                         f"{None if indices is None else (indices.shape, indices.dtype)}")
    path = layout.chunk_path(root, epoch, shard, chunk)
    record = layout.record_path(path)
    record.unlink(missing_ok=True)  # the chunk stops counting before its data changes
    blocks = [np.ascontiguousarray(values).tobytes()]
    if indices is not None:
        blocks.append(np.ascontiguousarray(indices).tobytes())
    digest = hashlib.sha256()
    for block in blocks:
        digest.update(block)
    atomic_write(path, blocks)
    entry = {"format": _RECORD_FORMAT, "epoch": epoch, "shard": shard, "chunk": chunk, "rows": rows,
             "bytes": sum(len(b) for b in blocks), "sha256": digest.hexdigest()}
    atomic_write(record, [json.dumps(entry, indent=1).encode()])
    return path


def _read_record(path: Path, expected: dict) -> dict:
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"teacher cache chunk record {path} is unreadable: {exc}") from None
    if not isinstance(entry, dict) or entry.get("format") != _RECORD_FORMAT:
        raise CacheError(f"teacher cache chunk record {path} is not a chunk record ({_RECORD_FORMAT})")
    for key, value in expected.items():
        if entry.get(key) != value:
            raise CacheError(f"teacher cache chunk record {path} says {key}={entry.get(key)!r}, expected {value!r}")
    digest = entry.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise CacheError(f"teacher cache chunk record {path} has no sha256")
    return entry


def chunk_problem(root: Path, layout: Layout, epoch: int, shard: int, chunk: int, verify: bool) -> str | None:
    """Why chunk (epoch, shard, chunk) is not usable (a sentence naming the file), or ``None`` if it is.

    Checks the record and the data file's size; with ``verify`` also its sha256.
    """
    path = layout.chunk_path(root, epoch, shard, chunk)
    record = layout.record_path(path)
    if not path.is_file():
        return f"{path} is missing"
    if not record.is_file():
        return f"{path} has no record {record.name} (its write did not finish)"
    expected = {"epoch": epoch, "shard": shard, "chunk": chunk, "rows": layout.chunk_rows(shard, chunk),
                "bytes": layout.chunk_bytes(shard, chunk)}
    try:
        entry = _read_record(record, expected)
    except CacheError as exc:
        return str(exc)
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"{path} is {size} bytes but must be {expected['bytes']} (truncated or overwritten)"
    if verify and sha256_file(path) != entry["sha256"]:
        return f"{path} is corrupt: its sha256 differs from the one recorded when it was written"
    return None


def values_to_torch(array: np.ndarray, value_dtype: str) -> torch.Tensor:
    """A values array read from disk as a torch tensor of its storage dtype (bf16 from its bit pattern)."""
    if value_dtype == "bf16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


class TeacherCacheFiles:
    """Reads ``(epoch, samples)`` rows of a cache's chunk files through memory maps.

    Chunks are opened on first use (their sha256 checked once then) and kept
    open, the ``max_open`` most recently used at most.
    """

    def __init__(self, root: str | Path, layout: Layout, max_open: int = 64) -> None:
        self.root, self.layout, self.max_open = Path(root), layout, max_open
        self._open: OrderedDict[tuple[int, int, int], tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        self._inverse: dict[int, np.ndarray] = {}

    def check_epochs(self, epochs) -> None:
        """Every chunk of ``epochs`` exists with its record and size; a :class:`CacheError` naming the first that does not."""
        for epoch in epochs:
            for shard, chunk in self.layout.chunks(epoch):
                problem = chunk_problem(self.root, self.layout, epoch, shard, chunk, verify=False)
                if problem is not None:
                    raise CacheError(f"teacher cache {self.root} is incomplete or damaged: {problem}; run "
                                     "`rcfast cache-teachers` again with the same arguments to finish or repair it")

    def _chunk(self, epoch: int, shard: int, chunk: int):
        key = (epoch, shard, chunk)
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        problem = chunk_problem(self.root, self.layout, epoch, shard, chunk, verify=True)
        if problem is not None:
            raise CacheError(f"teacher cache {self.root}: {problem}; run `rcfast cache-teachers` again with the same "
                             "arguments to rebuild it")
        layout = self.layout
        path = layout.chunk_path(self.root, epoch, shard, chunk)
        shape = (layout.chunk_rows(shard, chunk), layout.row_width)
        values = np.memmap(path, dtype=VALUE_DTYPES[layout.value_dtype][0], mode="r", shape=shape)
        indices = None
        if layout.index_dtype is not None:
            offset = shape[0] * shape[1] * layout.value_bytes
            indices = np.memmap(path, dtype=INDEX_DTYPES[layout.index_dtype], mode="r", shape=shape, offset=offset)
        self._open[key] = (values, indices)
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return values, indices

    def _inverse_order(self, epoch: int) -> np.ndarray:
        inverse = self._inverse.get(epoch)
        if inverse is None:
            inverse = self.layout.inverse_order(epoch)
            # This epoch and the one before: a run reads epochs in order.
            self._inverse = {e: v for e, v in self._inverse.items() if e == epoch - 1}
            self._inverse[epoch] = inverse
        return inverse

    def read(self, epoch: int, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(values, indices)`` ``[n, W]`` of global image indices ``samples`` in ``epoch`` (copies).

        ``indices`` is ``None`` for a dense cache.
        """
        layout = self.layout
        shard, chunk, row = layout.locate(self._inverse_order(epoch), samples)
        n = len(row)
        values = np.empty((n, layout.row_width), dtype=VALUE_DTYPES[layout.value_dtype][0])
        indices = (None if layout.index_dtype is None else
                   np.empty(values.shape, dtype=INDEX_DTYPES[layout.index_dtype]))
        groups = shard * (1 + int(chunk.max(initial=0))) + chunk
        for group in np.unique(groups):
            where = np.flatnonzero(groups == group)
            chunk_values, chunk_indices = self._chunk(epoch, int(shard[where[0]]), int(chunk[where[0]]))
            rows = row[where]
            if len(where) == n and n and rows[-1] - rows[0] == n - 1 and np.all(np.diff(rows) == 1):
                rows = slice(int(rows[0]), int(rows[0]) + n)  # a whole batch of the build: one contiguous read
                where = slice(None)
            values[where] = chunk_values[rows]
            if indices is not None:
                indices[where] = chunk_indices[rows]
        return values, indices
