"""JSONL metrics: one JSON object per logging step, appended and flushed as it happens."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["MetricsWriter", "read_metrics"]


class MetricsWriter:
    """Appends one line per :meth:`write` to ``path`` (only the main rank should own one).

    ``truncate_after(step)`` drops lines logged after ``step`` -- what a killed
    run wrote past its last checkpoint, which the resumed run logs again.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write
            if record.get("step", 0) <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
