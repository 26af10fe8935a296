"""Atomic file writes: a file gets all of its new contents or keeps its old ones.

The one home of rcfast's write-temp-fsync-rename: checkpoints
(:func:`rcfast.train.checkpoint.atomic_save`), teacher-cache chunks and
manifests, glyph data manifests, benchmark and run summaries, ``--json``
outputs. Standard library only, so every layer of the package can use it.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import BinaryIO, Iterator

__all__ = ["atomic_file", "atomic_write_json"]


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """``with atomic_file(path) as f: f.write(...)``: ``path`` gets all of it or is left as it was.

    The block writes a temporary file in ``path``'s folder; when it ends
    without an error, the file is fsync'ed, ``os.replace``d over ``path`` and
    the folder fsync'ed (a rename is durable only once the directory entry is on
    disk too). On any error the temporary file is removed; a file-system error
    (disk full, file too large, no permission) is an ``OSError`` naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        previous = " (the previous file there is intact)" if path.exists() else ""
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}{previous}") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | Path, data, **dumps_options) -> None:
    """``json.dumps(data, indent=1, **dumps_options)`` written to ``path`` atomically (UTF-8)."""
    text = json.dumps(data, **{"indent": 1, **dumps_options})
    with atomic_file(path) as f:
        f.write(text.encode("utf-8"))
