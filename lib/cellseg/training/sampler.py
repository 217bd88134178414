"""Deterministic, resumable sampling: the order of an epoch is a function of (seed, epoch) only.

Each rank takes a strided shard (padded by wrapping, as ``DistributedSampler`` does), and a resumed run skips the
samples already consumed in the interrupted epoch. The sampler yields ``(epoch, index)`` pairs so that DataLoader
workers (persistent, in other processes) see the epoch without any shared state; :class:`EpochIndexed` unpacks them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Dataset, Sampler


class EpochSampler(Sampler):
    def __init__(self, n: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 weights: np.ndarray | None = None):
        if n <= 0:
            raise ValueError("EpochSampler needs a non-empty dataset")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world_size
        self.shuffle, self.weights = shuffle, weights
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(n / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and how many of this rank's samples to skip (mid-epoch resume)."""
        self.epoch, self.start = epoch, start

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All ranks' indices of an epoch, before sharding."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.weights is not None:
            p = np.asarray(self.weights, dtype=np.float64)
            order = rng.choice(self.n, size=self.n, replace=True, p=p / p.sum())
        elif self.shuffle:
            order = rng.permutation(self.n)
        else:
            order = np.arange(self.n)
        total = self.per_rank * self.world
        return np.resize(order, total)  # wrap-around padding

    def __iter__(self) -> Iterator[tuple[int, int]]:
        shard = self.epoch_order(self.epoch)[self.rank::self.world]
        for i in shard[self.start:]:
            yield (self.epoch, int(i))

    def __len__(self) -> int:
        return self.per_rank - self.start


class EpochIndexed(Dataset):
    """Wraps a dataset with ``set_epoch`` so that ``ds[(epoch, i)]`` is ``ds.set_epoch(epoch); ds[i]``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]
