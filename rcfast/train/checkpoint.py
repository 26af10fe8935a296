"""Checkpoint files: atomic writes, content hashes, verified loading, discovery, and RNG state as plain data.

Checkpoints must load with ``torch.load(path, weights_only=True)`` (a checkpoint
is data, never code), so everything stored is a tensor or a primitive
container. The RNG states of torch, CUDA, NumPy and Python's ``random`` are
converted to tensors/lists here and back on restore.

A write goes to a temporary file in the same directory, is fsync'ed, then
``os.replace``d over the final name (and the directory fsync'ed): a run killed
at any moment leaves either the previous checkpoint or the new one, never a
torn file.

**Integrity.** torch's zip reader checks no CRCs: flipped bytes in a tensor
load silently. Every checkpoint rcfast writes (:func:`save_checkpoint_file`:
trainer checkpoints and ``final.pt``) therefore carries
``content_sha256``, a SHA-256 of its contents -- every key, number, string and
tensor (dtype, shape, bytes) in order -- computed from the objects, not the
file bytes, so it is checked after loading with no second read of the file.
:func:`load_checkpoint` verifies it, and requires it of any file that says it
is rcfast's (``format: "rcfast.*"``); plain state_dicts from elsewhere carry
no hash and load as they are. :func:`file_sha256` is the hash of a file's bytes
(what ``sha256sum`` prints), which a config can pin for a teacher
(``teachers[].sha256``).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pickle
import random
import re
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from rcfast.atomic import atomic_file
from rcfast.train.errors import CheckpointError

__all__ = ["atomic_save", "save_checkpoint_file", "check_checkpoint_file", "load_checkpoint", "content_digest",
           "file_sha256", "checkpoint_path", "list_checkpoints", "latest_checkpoint", "prune_checkpoints",
           "newest_loadable_checkpoint", "check_writable", "check_free_space", "capture_rng_state",
           "restore_rng_state", "isolated_rng", "seed_everything", "INTEGRITY_KEY"]

_NAME = re.compile(r"^checkpoint_(\d{9})\.pt$")
INTEGRITY_KEY = "content_sha256"
"""The key of the content hash in every checkpoint dict rcfast writes."""
_RCFAST_FORMAT_PREFIX = "rcfast."


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """``<directory>/checkpoint_<step:09d>.pt``."""
    return Path(directory) / f"checkpoint_{step:09d}.pt"


def _surface_write_error(f) -> OSError:
    """The file-system error behind a failed ``torch.save`` (torch reports a short write as a RuntimeError)."""
    try:
        f.write(b"\0" * 4096)
        f.flush()
        os.fsync(f.fileno())
    except OSError as exc:
        return exc
    return OSError(errno.EIO, "the checkpoint writer failed")


def atomic_save(obj, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (:func:`rcfast.atomic.atomic_file`).

    A failed write (disk full, file too large, no permission) raises ``OSError``
    naming ``path``; whatever was at ``path`` before is left untouched.
    """
    with atomic_file(path) as f:
        try:
            torch.save(obj, f)
        except RuntimeError as exc:
            raise _surface_write_error(f) from exc
    return Path(path)


# ---------------------------------------------------------------------- content hash
def _feed(h, obj) -> None:
    """Hash ``obj`` with its type and structure (so ``[1, 2]`` and ``(1, 2)`` or ``"1"`` differ)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.layout != torch.strided:
            raise TypeError(f"cannot hash a {t.layout} tensor in a checkpoint")
        t = t.to("cpu").contiguous()
        h.update(b"T%s%s;" % (str(t.dtype).encode(), repr(tuple(t.shape)).encode()))
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(b"D%d;" % len(obj))
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
        metadata = getattr(obj, "_metadata", None)  # a module state_dict's version info, saved with it
        if metadata is not None:
            h.update(b"M")
            _feed(h, metadata)
    elif isinstance(obj, (list, tuple)):
        h.update(b"%s%d;" % (b"L" if isinstance(obj, list) else b"U", len(obj)))
        for value in obj:
            _feed(h, value)
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(b"S%d;" % len(data))
        h.update(data)
    elif isinstance(obj, bytes):
        h.update(b"B%d;" % len(obj))
        h.update(obj)
    elif obj is None or isinstance(obj, bool):
        h.update(b"N;" if obj is None else (b"1;" if obj else b"0;"))
    elif isinstance(obj, int):
        h.update(b"I%d;" % obj)
    elif isinstance(obj, float):
        h.update(b"F" + struct.pack("<d", obj))
    elif isinstance(obj, (torch.dtype, torch.device)):
        h.update(b"O%s;" % str(obj).encode())
    else:
        raise TypeError(f"cannot hash a {type(obj).__name__} in a checkpoint (tensors and plain data only)")


def content_digest(obj) -> str:
    """SHA-256 (hex) of a checkpoint's contents: keys, numbers, strings, tensors' dtype/shape/bytes, in order."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes -- what ``sha256sum`` prints."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _to_cpu(obj):
    """A copy of a checkpoint tree with every tensor on the CPU (dict types and state_dict metadata kept)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        out = type(obj)((k, _to_cpu(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module state_dict's version info (load_state_dict reads it)
            out._metadata = obj._metadata
        return out
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if type(obj) is tuple:
        return tuple(_to_cpu(v) for v in obj)
    return obj


def save_checkpoint_file(state: dict, path: str | Path) -> Path:
    """Write ``state`` (a dict of tensors and plain data) atomically with its content hash.

    Tensors are moved to the CPU first (what is hashed is what is written). The
    file loads with ``torch.load(weights_only=True)``; :func:`load_checkpoint`
    verifies the hash.
    """
    if not isinstance(state, dict):
        raise TypeError(f"a checkpoint is a dict, got {type(state).__name__}")
    if INTEGRITY_KEY in state:
        raise ValueError(f"{INTEGRITY_KEY!r} is reserved for the checkpoint's content hash")
    state = _to_cpu(state)
    state[INTEGRITY_KEY] = content_digest(state)
    return atomic_save(state, path)


def _load_failure(exc: BaseException, path: Path) -> str:
    """Why ``torch.load(weights_only=True)`` failed on ``path``, in one line a user can act on."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            return (f"it holds code or objects other than tensors and plain data ({found.group(1)}), refused: "
                    "a checkpoint is data, never code (torch.load weights_only=True)")
        return "not a torch checkpoint (it does not unpickle as tensors and plain data)"
    if isinstance(exc, EOFError):
        return "the file ends early (truncated)"
    if zipfile.is_zipfile(path):  # a complete zip archive torch cannot read as a checkpoint
        return "a zip archive, but not a torch checkpoint"
    if "central directory" in text or "zip archive" in text:
        return "truncated, or not a torch checkpoint (its zip archive is incomplete)"
    first = " ".join(text.split())[:300]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def check_checkpoint_file(path: str | Path, what: str = "checkpoint") -> Path:
    """``path`` if it is a non-empty regular file; a :class:`CheckpointError` naming ``what`` and why otherwise."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a directory, not a checkpoint file")
    if not path.exists():
        raise CheckpointError(f"{what} file {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a regular file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"{what} {path} cannot be read: {exc.strerror or exc}") from exc
    if size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes)")
    return path


def load_checkpoint(path: str | Path, map_location="cpu", *, what: str = "checkpoint") -> object:
    """Load ``path`` with ``torch.load(weights_only=True)`` and verify its content hash.

    Returns the loaded object without the hash entry. Raises
    :class:`CheckpointError` naming ``path`` (and ``what`` it is, e.g.
    ``"teacher 'a' checkpoint"``) when the file is missing, a directory, empty,
    truncated, not a torch file, holds code, fails its content hash, or says it
    is an rcfast checkpoint (``format: "rcfast.*"``) but carries no hash. A
    plain state_dict without a hash (a checkpoint from elsewhere) is returned
    as loaded.
    """
    path = check_checkpoint_file(path, what)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # every failure mode of a bad file: report which, without a traceback
        raise CheckpointError(f"{what} {path} is not a loadable weights-only checkpoint: {_load_failure(exc, path)}") \
                from exc
    if not isinstance(obj, dict):
        return obj
    stored = obj.pop(INTEGRITY_KEY, None)
    if stored is None:
        fmt = obj.get("format")
        if isinstance(fmt, str) and fmt.startswith(_RCFAST_FORMAT_PREFIX):
            raise CheckpointError(f"{what} {path} says it is an rcfast checkpoint ({fmt}) but carries no content "
                                  "hash: it was altered, or written by an older rcfast")
        return obj
    try:
        actual = content_digest(obj)
    except TypeError as exc:
        raise CheckpointError(f"{what} {path} is corrupt: {exc}") from exc
    if not isinstance(stored, str) or actual != stored:
        raise CheckpointError(f"{what} {path} is corrupt: its contents do not match their sha256 "
                              f"(stored {str(stored)[:16]}..., computed {actual[:16]}...)")
    return obj


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of complete checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _NAME.match(entry.name)
        if match:  # temp files never match, so a torn write is never picked up
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``directory``, or ``None``."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` most recent checkpoints."""
    for _, path in list_checkpoints(directory)[:-keep]:
        path.unlink(missing_ok=True)


def newest_loadable_checkpoint(directory: str | Path, check=None):
    """The newest checkpoint in ``directory`` that loads, verifies and passes ``check(state)``.

    Returns ``(path, state, skipped)`` where ``skipped`` lists ``(path, reason)``
    of newer checkpoints that failed (a run killed while the disk filled, a
    file damaged later); ``(None, None, [])`` when there are none. Raises
    :class:`CheckpointError` when checkpoints exist but none is usable: a run
    never silently starts over on top of them.
    """
    skipped = []
    for _, path in reversed(list_checkpoints(directory)):
        try:
            state = load_checkpoint(path)
            if check is not None:
                check(state)
        except CheckpointError as exc:
            skipped.append((path, str(exc) if str(path) in str(exc) else f"{path}: {exc}"))
            continue
        return path, state, skipped
    if skipped:
        reasons = "; ".join(reason for _, reason in skipped)
        raise CheckpointError(f"no usable checkpoint in {directory}: {reasons}. Remove or replace them, or set "
                              "train.resume: none (or another train.out_dir) to start over")
    return None, None, []


def check_writable(directory: str | Path, what: str = "train.out_dir") -> Path:
    """Create ``directory`` if needed and prove a file can be written, synced and removed there.

    Raises ``OSError`` naming ``what`` and the reason (read-only, not a
    directory, permission denied, disk full) -- before a run loads anything.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".rcfast-write-test-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"rcfast" * 1024)
                f.flush()
                os.fsync(f.fileno())
        finally:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"{what}: cannot write to {directory}: {exc.strerror or exc}") from exc
    return directory


def check_free_space(directory: str | Path, needed_bytes: int, what: str = "train.out_dir") -> None:
    """Raise ``OSError`` (ENOSPC) if ``directory``'s file system has less than ``needed_bytes`` free."""
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise OSError(28, f"{what}: {directory} has {free / 2**20:.1f} MiB free, but this run's checkpoints need "
                          f"about {needed_bytes / 2**20:.1f} MiB (one checkpoint, its temporary copy and final.pt)")


def capture_rng_state() -> dict:
    """This process's RNG states as tensors and lists (``weights_only``-loadable)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": int(py_version), "internal": list(py_internal), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's and torch's global RNGs (inside :func:`isolated_rng` in library code)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def isolated_rng():
    """Run a block on the global RNGs, then put the caller's RNG states back.

    The trainer seeds and draws from the global RNGs (dropout and friends read
    torch's) inside this, so a caller's random streams are as they were after
    constructing or fitting a trainer.
    """
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)
