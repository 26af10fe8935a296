"""The transfer benchmark's settings: the data protocol, the budgets, the evaluation and the claims' margin.

Defaults are the full benchmark (3 seeds, within 30 minutes of CPU time on a
2-core machine); :meth:`BenchmarkSettings.quick` is the smoke-test size. Every
value goes into ``benchmark.json`` of the output folder, so a folder is only
ever continued with exactly the settings that started it (more or fewer
seeds aside: each seed is an independent replicate).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from rcfast.data.glyphs.protocol import GlyphProtocol

__all__ = ["BenchmarkSettings", "SIZES", "STUDENT_INITS", "FORMAT", "VERSION"]

FORMAT = "rcfast.transfer_benchmark"
VERSION = 1  # bump when a change makes earlier results incomparable
STUDENT_INITS = ("generalist", "random")
PRECISIONS = ("fp32", "bf16")
DATA_BACKENDS = ("auto", "dali", "pil")
SIZES = ("quick", "medium", "full")  # the presets of BenchmarkSettings.preset


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _positive_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass
class BenchmarkSettings:
    """Everything that determines the benchmark's numbers.

    Runs per seed: the generalist (``generalist_steps`` from scratch), one
    specialist per specialist script (``specialist_steps`` fine-tuning from the
    generalist at ``specialist_lr``), and four students of ``student_steps``
    each (single-head KD, RepCon, multi-head KD, the oracle), initialised from
    the generalist (``student_init="generalist"``, as in the paper) or at
    random. Downstream: linear probes (logistic regression on standardised
    features with inverse regularisation ``probe_C``) and cosine kNN
    (``knn_k``, at most the shot count) on frozen features with ``shots``
    training images per class.
    """

    protocol: GlyphProtocol = field(default_factory=GlyphProtocol)
    seeds: int = 3
    width: int = 16
    batch_size: int = 64
    lr: float = 2e-3
    generalist_steps: int = 1500
    specialist_steps: int = 300
    specialist_lr: float = 2e-3
    student_steps: int = 500
    temperature: float = 4.0
    student_init: str = "generalist"
    shots: tuple[int, ...] = (5, 20)
    knn_k: int = 5
    probe_C: float = 0.5
    oracle_margin: float = 0.02
    precision: str = "fp32"
    data_backend: str = "auto"
    data_threads: int = 1

    @classmethod
    def quick(cls, **changes) -> "BenchmarkSettings":
        """The smoke-test size: every step of the protocol on tiny data and budgets (2 seeds)."""
        protocol = GlyphProtocol(general_classes=40, general_future_classes=10, specialist_classes=10,
                                 specialist_future_classes=8, unused_classes=10, teacher_train_images=8,
                                 teacher_test_images=4, proxy_images=4, probe_train_images=5, probe_test_images=5)
        values = dict(protocol=protocol, seeds=2, batch_size=32, generalist_steps=30, specialist_steps=10,
                      student_steps=10, shots=(2, 5), knn_k=2)
        values.update(changes)
        return cls(**values)

    @classmethod
    def medium(cls, **changes) -> "BenchmarkSettings":
        """A reduced benchmark for a loaded or small machine (about 4 CPU-minutes per seed, 1 thread).

        The protocol keeps its shape -- 300 general classes, two specialist
        scripts, held-out classes of each, an unused script -- with fewer images
        per class (20 labeled, 20 proxy, 20 + 10 downstream), fewer held-out
        classes and about 40 % of the full training steps.
        """
        protocol = GlyphProtocol(general_future_classes=50, specialist_classes=60, specialist_future_classes=40,
                                 unused_classes=50, teacher_train_images=20, teacher_test_images=5,
                                 proxy_images=20, probe_test_images=10)
        values = dict(protocol=protocol, generalist_steps=600, specialist_steps=150, student_steps=250)
        values.update(changes)
        return cls(**values)

    @classmethod
    def preset(cls, size: str, **changes) -> "BenchmarkSettings":
        """The settings of a named size: ``"quick"``, ``"medium"`` or ``"full"`` (the defaults)."""
        if size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {size!r}")
        return {"quick": cls.quick, "medium": cls.medium, "full": cls}[size](**changes)

    def __post_init__(self):
        self.shots = tuple(self.shots) if isinstance(self.shots, (list, tuple)) else self.shots

    def validate(self) -> "BenchmarkSettings":
        """Raise ValueError/TypeError naming the setting for a bad value (scripts are checked later)."""
        if not isinstance(self.protocol, GlyphProtocol):
            raise TypeError(f"protocol must be a GlyphProtocol, got {type(self.protocol).__name__}")
        for name in ("seeds", "width", "batch_size", "generalist_steps", "specialist_steps", "student_steps",
                     "knn_k", "data_threads"):
            _positive_int(name, getattr(self, name))
        for name in ("lr", "specialist_lr", "temperature", "oracle_margin", "probe_C"):
            _positive_float(name, getattr(self, name))
        if self.student_init not in STUDENT_INITS:
            raise ValueError(f"student_init must be one of {STUDENT_INITS}, got {self.student_init!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.data_backend not in DATA_BACKENDS:
            raise ValueError(f"data_backend must be one of {DATA_BACKENDS}, got {self.data_backend!r}")
        if not isinstance(self.shots, tuple) or not self.shots:
            raise ValueError(f"shots must be a non-empty list of images per class, got {self.shots!r}")
        for n in self.shots:
            _positive_int("shots", n)
        if len(set(self.shots)) != len(self.shots) or list(self.shots) != sorted(self.shots):
            raise ValueError(f"shots must be increasing and distinct, got {list(self.shots)}")
        if max(self.shots) > self.protocol.probe_train_images:
            raise ValueError(f"shots: {max(self.shots)} images per class asked, but the downstream train split "
                             f"holds protocol.probe_train_images={self.protocol.probe_train_images}")
        return self

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds))

    def as_dict(self) -> dict:
        """JSON-ready: what ``benchmark.json`` stores and compares."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["protocol"] = self.protocol.as_dict()
        values["shots"] = list(self.shots)
        return values

    def spec(self) -> dict:
        """The identity of a benchmark folder: format, version and every setting."""
        return {"format": FORMAT, "version": VERSION, "settings": self.as_dict()}
