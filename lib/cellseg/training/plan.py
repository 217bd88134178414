"""Which images each optimizer step trains on, independent of ``BATCH_SIZE`` and of the number of ranks.

An epoch is one global order of the training images, a function of (``SEED``, epoch) only. Optimizer step ``s`` of
the epoch consumes the contiguous block ``order[s*E:(s+1)*E]`` of ``E`` = effective batch images (the last block may
be shorter). The block is cut into one contiguous chunk per rank, and each rank cuts its chunk into micro-batches of
at most ``BATCH_SIZE``. Because every loss term is a mean of per-image terms (``cellseg.losses``), weighting each
micro-batch by its share of the block makes the step's gradient the mean over the block, whatever the split: a run
that lowers ``BATCH_SIZE`` after an out-of-memory error (same effective batch), or is requeued onto another GPU count,
trains the same images in each step with the same schedule, and resumes at the exact image where it stopped
(``torch.utils.data.DistributedSampler`` shards by rank instead, so the order depends on the world size).

A rank whose chunk of a (short, last) block is empty still takes part in DDP's gradient all-reduce: it runs one
micro-batch of the block's first image with weight 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
from torch.utils.data import Sampler

PLAN_VERSION = 1  # bump when the order or the split changes: a mid-epoch checkpoint of another version is refused


@dataclass(frozen=True)
class SamplePlan:
    """The per-epoch sample plan every rank derives identically.

    Attributes:
        n: training images.
        effective_batch: images per optimizer step over all ranks and micro-batches (``GRAD_ACCUM_TARGET``).
        steps_per_epoch: optimizer steps per epoch (``MAX_STEPS_PER_EPOCH`` caps it).
        seed: ``SEED``; the order of epoch ``e`` comes from ``(seed, e)``.
        weighted: the order is drawn with replacement by sample weights (``OVERSAMPLE_RARE``).
    """

    n: int
    effective_batch: int
    steps_per_epoch: int
    seed: int
    weighted: bool = False
    version: int = PLAN_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    def block(self, order: np.ndarray, step: int) -> np.ndarray:
        """Global indices of optimizer step ``step`` of an epoch whose order is ``order``."""
        return order[step * self.effective_batch:(step + 1) * self.effective_batch]

    def samples_before(self, step: int) -> int:
        """Images of the epoch consumed by its first ``step`` optimizer steps."""
        return min(self.n, step * self.effective_batch)


def build_plan(n: int, *, effective_batch: int, max_steps: int, seed: int, weighted: bool = False) -> SamplePlan:
    """The plan of ``n`` images in steps of ``effective_batch`` (at most ``max_steps`` per epoch; 0: no cap).

    Raises:
        ValueError: an empty training split or a non-positive effective batch.
    """
    if n <= 0:
        raise ValueError("the training split is empty: nothing to train on. Check DATA_CACHE's train/ folder "
                         "(re-run notebooks/00_prepare_data.ipynb).")
    if effective_batch <= 0:
        raise ValueError(f"the effective batch (GRAD_ACCUM_TARGET, or BATCH_SIZE x ranks) must be > 0, got "
                         f"{effective_batch}.")
    steps = math.ceil(n / effective_batch)
    return SamplePlan(n=n, effective_batch=effective_batch, steps_per_epoch=min(steps, max_steps) if max_steps else steps,
                      seed=seed, weighted=weighted)


def epoch_order(plan: SamplePlan, epoch: int, weights: np.ndarray | None = None) -> np.ndarray:
    """All images of epoch ``epoch`` in training order (a permutation, or a weighted draw with replacement)."""
    rng = np.random.default_rng([plan.seed, epoch])
    if weights is not None:
        p = np.asarray(weights, dtype=np.float64)
        return rng.choice(plan.n, size=plan.n, replace=True, p=p / p.sum())
    return rng.permutation(plan.n)


def split_block(block: np.ndarray, rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """This rank's micro-batches of one step's block: its contiguous chunk cut into pieces of ``batch_size``.
    An empty chunk gives ``[]`` (one weight-0 micro-batch, so the rank still joins the all-reduce)."""
    per_rank = math.ceil(len(block) / world_size)
    chunk = [int(i) for i in block[rank * per_rank:(rank + 1) * per_rank]]
    if not chunk:
        return [[]]
    return [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]


def max_micro_batches(effective_batch: int, world_size: int, batch_size: int) -> int:
    """Micro-batches per optimizer step on the busiest rank (the accumulation factor printed by the notebook)."""
    return max(1, math.ceil(math.ceil(effective_batch / world_size) / batch_size))


class StepBatchSampler(Sampler):
    """A ``batch_sampler`` yielding this rank's micro-batches of ``(epoch, index)`` pairs, from step ``start_step``
    of the epoch selected with :meth:`set_epoch`. An empty micro-batch yields the block's first image (weight 0)."""

    def __init__(self, plan: SamplePlan, *, rank: int, world_size: int, batch_size: int,
                 weights: np.ndarray | None = None):
        self.plan, self.rank, self.world, self.batch_size, self.weights = plan, rank, world_size, batch_size, weights
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def steps(self, epoch: int, start_step: int = 0) -> Iterator[tuple[np.ndarray, list[list[int]]]]:
        """(block, this rank's micro-batches) for each remaining step of ``epoch``."""
        order = epoch_order(self.plan, epoch, self.weights)
        for s in range(start_step, self.plan.steps_per_epoch):
            block = self.plan.block(order, s)
            yield block, split_block(block, self.rank, self.world, self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for block, micro in self.steps(self.epoch, self.start_step):
            for mb in micro:
                yield [(self.epoch, i) for i in (mb or [int(block[0])])]

    def __len__(self) -> int:
        return sum(len(m) for _, m in self.steps(self.epoch, self.start_step))
