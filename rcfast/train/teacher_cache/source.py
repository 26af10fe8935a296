"""``CachedTeachers``: a :class:`~rcfast.train.teachers.TeacherSource` that reads a teacher cache instead of running teachers.

Each step the trainer passes the batch's ``(epoch, batch index)``; with the
dataset's ``epoch_indices(epoch)`` that names the batch's global image
indices, whose rows this source reads from the cache (every DDP rank its own
samples). A dense cache gives the packed logits, in the dtype the teachers
produced them in -- with fp32 storage bitwise what the teachers computed -- to
any term; a top-k cache gives
:class:`~rcfast.train.sparse_teacher.SparseTeacherLogits`, to the terms that
accept them (``TeacherLogits(..., accepts_top_k=True)``: ``multihead_kd``,
which feeds them to the sparse loss); a term that needs dense logits is
refused before training. A cache built with its tail mass (the default) adds each
teacher's ``fill`` (the logit of its classes outside the k) and is refused for
a term that reads the teacher at another temperature than it was built for.

:meth:`CachedTeachers.for_run` opens a cache for a run and refuses it before
training when it does not match: other data, seed, augmentation, image size,
decoder or device, teachers or their precision (the manifest's pins, compared
field by field), or fewer epochs than ``train.max_steps`` reads; and when a
chunk file a run needs is missing or has the wrong size.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rcfast.train.config import PROXY_STREAM, ConfigError
from rcfast.train.objectives.inputs import InputKey, TeacherLayer, TeacherLogits
from rcfast.train.sparse_teacher import SparseTeacherLogits
from rcfast.train.step_inputs import select_columns
from rcfast.train.teacher_cache.manifest import check_pins, read_manifest, run_pins
from rcfast.train.teacher_cache.store import VALUE_DTYPES, CacheError, TeacherCacheFiles, values_to_torch
from rcfast.train.teachers import TeacherOutputs, TeacherRequest, TeacherSource

__all__ = ["CachedTeachers"]


class CachedTeachers(TeacherSource):
    """Teacher logits read from the cache at ``root`` for the batches of ``dataset`` (the ``stream``).

    Args:
        root: the cache folder (``rcfast cache-teachers --out``).
        dataset: the stream's dataset (``ProxyImages`` interface: ``epoch_indices``,
            ``batch_size``); its batches must be the ones the cache covers
            (check with :meth:`for_run`).
        epochs: the epochs the run reads; their chunk files are checked now.
        stream: the data stream the cache holds (``"proxy"``).
    """

    models = None  # no teacher layers: terms that hook them are refused up front

    def __init__(self, root: str | Path, dataset, epochs: Sequence[int] | None = None,
                 stream: str = PROXY_STREAM) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.layout = self.manifest["layout"]
        self.storage = self.manifest["storage"]
        self.dataset, self.stream = dataset, stream
        teachers = self.manifest["pins"]["teachers"]
        self.num_classes = {t["name"]: int(t["num_classes"]) for t in teachers}
        self.order = tuple(self.num_classes)
        self.top_k = int(self.storage["top_k"])
        tail = self.storage["tail_temperatures"]
        self.tail_temperatures = None if tail is None else dict(zip(self.order, map(float, tail)))
        self.logits_dtype = getattr(torch, self.storage["logits_dtype"])
        self.files = TeacherCacheFiles(self.root, self.layout)
        total = getattr(dataset, "total_images", self.layout.num_images)
        if total != self.layout.num_images:
            raise CacheError(f"teacher cache {self.root} holds {self.layout.num_images} images per epoch, the "
                             f"run's data has {total}")
        if epochs is not None:
            epochs = list(epochs)
            if epochs and max(epochs) >= self.manifest["epochs"]:
                raise CacheError(f"teacher cache {self.root} holds {self.manifest['epochs']} epoch(s), but this run "
                                 f"reads {max(epochs) + 1}: build it with `rcfast cache-teachers --epochs "
                                 f"{max(epochs) + 1}` (the same --out extends it), or lower train.max_steps")
            self.files.check_epochs(epochs)
        self.device = torch.device("cpu")

    @classmethod
    def for_run(cls, config, dataset, root: str | Path | None = None) -> "CachedTeachers":
        """The cache ``config.teacher_cache`` (or ``root``) for a run on ``dataset``, checked against the run.

        Refused (:class:`CacheError`, naming the differing field) when its pins
        differ from the run's or it covers fewer epochs than ``train.max_steps`` reads.
        """
        root = Path(root if root is not None else config.teacher_cache)
        manifest = read_manifest(root)
        check_pins(root, manifest["pins"], run_pins(config, dataset))
        epochs = math.ceil(config.train.max_steps / len(dataset))
        return cls(root, dataset, epochs=range(epochs))

    # -- TeacherSource
    @property
    def dense(self) -> bool:
        """A dense cache (every teacher's logits, packed): the source gives packed dense logits."""
        return self.layout.index_dtype is None

    def to(self, device) -> "CachedTeachers":
        self.device = torch.device(device)
        return self

    def check_inputs(self, keys: Sequence[InputKey]) -> None:
        """Refuse, before training, inputs a logit cache cannot give (see :meth:`TeacherSource.check_inputs`)."""
        for key in keys:
            if isinstance(key, TeacherLayer):
                raise ConfigError(f"an objective term needs features of teacher {key.teacher!r}'s layer "
                                  f"{key.layer!r}, but the teacher cache {self.root} holds logits only: run the "
                                  "teachers online (no teacher_cache)")
            if not isinstance(key, TeacherLogits):
                continue
            if key.stream != self.stream:
                raise ConfigError(f"an objective term needs teacher logits on the data stream {key.stream!r}, but "
                                  f"the teacher cache {self.root} holds them for {self.stream!r} only")
            if not self.dense and not key.accepts_top_k:
                raise ConfigError(f"an objective term needs the dense logits of teachers {list(key.teachers)}, but "
                                  f"the teacher cache {self.root} holds their top {self.top_k} only: build a "
                                  "dense cache (cache-teachers without --top-k) or run the teachers online")
            if self.tail_temperatures is not None:  # (read_manifest: a dense cache has none)
                # The stored fill keeps the tail's mass at one temperature only.
                read_at = key.temperatures or (None,) * len(key.teachers)
                for teacher, tau in zip(key.teachers, read_at):
                    built = self.tail_temperatures.get(teacher)
                    if tau is None or built is None or not math.isclose(tau, built, rel_tol=1e-6):
                        at = "an undeclared temperature" if tau is None else tau
                        raise ConfigError(f"the teacher cache {self.root} keeps teacher {teacher!r}'s tail mass at "
                                          f"temperature {built}, but an objective term reads it at {at}: build "
                                          "the cache from this config, or with --no-tail-mass")

    def __call__(self, request: TeacherRequest) -> TeacherOutputs:
        if request.stream != self.stream:
            raise ValueError(f"teacher cache {self.root} holds the stream {self.stream!r}, not {request.stream!r}")
        if request.layers:
            raise ValueError(f"teacher cache {self.root} holds logits only, no teacher layers")
        if request.position is None:
            raise ValueError("a teacher cache needs each batch's (epoch, batch index): the dataset must report it "
                             "through state_dict() (epoch, batches_consumed)")
        epoch, batch = request.position
        batch_size = self.dataset.batch_size
        samples = np.asarray(self.dataset.epoch_indices(epoch)[batch * batch_size:(batch + 1) * batch_size])
        if len(samples) != request.images.shape[0]:
            raise ValueError(f"batch {batch} of epoch {epoch} has {request.images.shape[0]} images but the dataset "
                             f"names {len(samples)} samples for it")
        if epoch >= self.manifest["epochs"]:
            raise CacheError(f"teacher cache {self.root} holds {self.manifest['epochs']} epochs; the run reached "
                             f"epoch {epoch}")
        values_np, indices_np = self.files.read(epoch, samples)
        values = values_to_torch(values_np, self.layout.value_dtype)
        if self.dense:  # the packed logits of every teacher, as they ran
            packed = select_columns(values, self.order, self.num_classes, request.teachers)
            return TeacherOutputs(packed.to(self.device, self.logits_dtype, non_blocking=True))
        rows = [self.order.index(t) for t in request.teachers]
        entries = self.top_k + (0 if self.tail_temperatures is None else 1)
        values = values.view(len(samples), len(self.order), entries)[:, rows]
        indices = torch.from_numpy(indices_np).view(len(samples), len(self.order), entries)[:, rows]
        fill = None
        if self.tail_temperatures is not None:  # each teacher's last entry is its tail's fill logit
            values, fill = values[..., :self.top_k], values[..., self.top_k].to(self.device, non_blocking=True)
            indices = indices[..., :self.top_k]
        indices = indices.to(torch.int32)
        return TeacherOutputs(SparseTeacherLogits(values.to(self.device, non_blocking=True),
                                                  indices.to(self.device, non_blocking=True),
                                                  request.teachers, self.num_classes, fill))

    def __repr__(self) -> str:
        kind = "dense" if self.dense else f"top-{self.top_k}" + (" + tail" if self.tail_temperatures else "")
        return (f"CachedTeachers({str(self.root)!r}, {kind}, {VALUE_DTYPES[self.layout.value_dtype][1]}, "
                f"teachers={list(self.order)}, epochs={self.manifest['epochs']})")
