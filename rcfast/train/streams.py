"""``DataStream``: endless, resumable iteration over an epoch-based dataset.

The trainer counts optimiser steps, not epochs; this wrapper walks a dataset
with the ``ProxyImages`` interface (``set_epoch``, ``state_dict``,
``load_state_dict``) epoch after epoch and records where it is, so a resumed run
continues with exactly the batches the interrupted run had not used yet.
"""
from __future__ import annotations

import torch

__all__ = ["DataStream"]


class DataStream:
    """Yields batches of ``dataset`` forever, advancing its epoch when one ends."""

    def __init__(self, name: str, dataset) -> None:
        for method in ("__iter__", "set_epoch", "state_dict", "load_state_dict"):
            if not hasattr(dataset, method):
                raise TypeError(f"dataset {name!r} ({type(dataset).__name__}) has no {method}(); "
                                "it needs the rcfast.data.ProxyImages interface")
        self.name = name
        self.dataset = dataset
        self.epoch = 0
        self._iterator = None
        dataset.set_epoch(0)

    def _start_epoch(self):
        """A fresh iterator over the dataset's current position, and its first batch.

        Starting an iterator may draw from the global torch RNG (a DataLoader
        draws its base seed). A resumed run starts one at a step where the
        uninterrupted run did not, so that draw is kept out of the training RNG
        stream: otherwise the two runs' RNG states (dropout, ...) would diverge.
        """
        with torch.random.fork_rng(devices=[]):
            self._iterator = iter(self.dataset)
            return next(self._iterator)

    def next(self):
        """The next batch, starting a new epoch when the current one is used up."""
        try:
            if self._iterator is None:
                return self._start_epoch()
            return next(self._iterator)
        except StopIteration:
            pass
        # The dataset advances its own epoch when an iteration completes; set_epoch
        # to the same value keeps its position, so this is only a safeguard.
        self.epoch += 1
        self.dataset.set_epoch(self.epoch)
        try:
            return self._start_epoch()
        except StopIteration:
            raise RuntimeError(f"dataset {self.name!r} yields no batches (len={len(self.dataset)}); "
                               "are there fewer images than one batch with drop_last?") from None

    def position(self) -> tuple[int, int] | None:
        """``(epoch, batch index within it)`` of the batch :meth:`next` returned last.

        Read from the dataset's ``state_dict`` (``epoch``, ``batches_consumed``,
        counted when a batch is handed out); ``None`` for a dataset without them.
        With ``dataset.epoch_indices(epoch)`` this names the batch's samples
        (what a cache of teacher outputs is keyed on).
        """
        state = self.dataset.state_dict()
        if "epoch" not in state or "batches_consumed" not in state:
            return None
        return int(state["epoch"]), int(state["batches_consumed"]) - 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "dataset": self.dataset.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.dataset.load_state_dict(state["dataset"])
        self._iterator = None
