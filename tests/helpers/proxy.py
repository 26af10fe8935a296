"""``TensorProxy``: in-memory tensors behind the ``ProxyImages`` iteration interface.

Same contract as ``rcfast.data.ProxyImages`` where the trainer depends on it:
``len()`` = batches per epoch of this shard, ``set_epoch``, ``state_dict`` /
``load_state_dict`` (epoch + batches consumed, so a resumed iterator yields
exactly the remaining batches), sharding by ``shard_id``/``num_shards`` (default:
the torch.distributed rank/world size) and ``(images, labels)`` with
``labels=True``; finishing an epoch advances it. Shards are strided over one seeded permutation per epoch, as
``DistributedSampler`` does, so the union of the shards' i-th batches is the
single-process i-th batch of ``num_shards`` times the size.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def toy_images(num: int, num_classes: int, image_size: int = 8, seed: int = 0):
    """Class-dependent images ``[num, 3, S, S]`` and labels: a learnable toy task."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num) % num_classes
    prototypes = torch.randn(num_classes, 3, image_size, image_size, generator=gen)
    images = prototypes[labels] + 0.5 * torch.randn(num, 3, image_size, image_size, generator=gen)
    return images, labels


class TensorProxy:
    """Batches of in-memory images, resumable and shardable like ``ProxyImages``."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor | None = None, batch_size: int = 8,
                 shard_id: int | None = None, num_shards: int | None = None, seed: int = 0,
                 labels: bool = False, drop_last: bool = True) -> None:
        if labels and targets is None:
            raise ValueError("labels=True needs targets")
        if shard_id is None or num_shards is None:
            initialized = dist.is_available() and dist.is_initialized()
            shard_id = dist.get_rank() if initialized else 0
            num_shards = dist.get_world_size() if initialized else 1
        self.images, self.targets = images, targets
        self.batch_size, self.shard_id, self.num_shards = batch_size, shard_id, num_shards
        self.seed, self.labels, self.drop_last = seed, labels, drop_last
        self.epoch, self.consumed = 0, 0

    def _shard_indices(self) -> torch.Tensor:
        n = self.images.shape[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        total = math.ceil(n / self.num_shards) * self.num_shards
        perm = torch.cat([perm, perm[: total - n]])  # pad like DistributedSampler
        return perm[self.shard_id::self.num_shards]

    def __len__(self) -> int:
        per_shard = math.ceil(self.images.shape[0] / self.num_shards)
        return per_shard // self.batch_size if self.drop_last else math.ceil(per_shard / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["batches_consumed"])

    def __iter__(self):
        # Like ProxyImages: one epoch from the current position; finishing it
        # advances the epoch.
        indices = self._shard_indices()
        while self.consumed < len(self):
            idx = indices[self.consumed * self.batch_size:(self.consumed + 1) * self.batch_size]
            self.consumed += 1
            if self.labels:
                yield self.images[idx], self.targets[idx]
            else:
                yield self.images[idx]
        self.epoch, self.consumed = self.epoch + 1, 0
