"""Checkpoint files: atomic writes, discovery, and RNG state as plain data.

Checkpoints must load with ``torch.load(path, weights_only=True)`` (a checkpoint
is data, never code), so everything stored is a tensor or a primitive
container. The RNG states of torch, CUDA, NumPy and Python's ``random`` are
converted to tensors/lists here and back on restore.

A write goes to a temporary file in the same directory, is fsync'ed, then
``os.replace``d over the final name (and the directory fsync'ed): a run killed
at any moment leaves either the previous checkpoint or the new one, never a
torn file.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

__all__ = ["atomic_save", "load_checkpoint", "checkpoint_path", "list_checkpoints",
           "latest_checkpoint", "prune_checkpoints", "capture_rng_state", "restore_rng_state",
           "isolated_rng", "seed_everything"]

_NAME = re.compile(r"^checkpoint_(\d{9})\.pt$")


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """``<directory>/checkpoint_<step:09d>.pt``."""
    return Path(directory) / f"checkpoint_{step:09d}.pt"


def atomic_save(obj, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (temp file, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    # The rename is durable only once the directory entry is on disk too.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; a clear error if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)


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
