"""Deterministic global batch order for data-parallel training with gradient accumulation.

Every rank builds the same `BatchPlan` from the same numbers and computes its own slice
locally: nothing is communicated. The order of an epoch is a seeded permutation of all
sample positions (data/permutation.py, keyed by (seed, epoch)), cut into global batches of
G = micro_batch * world_size * grad_accum; the last incomplete batch of each epoch is dropped.
Any step's positions, and any position's slot, are computed on their own: no process holds
an epoch's whole order (the data stage's read tasks compute their rows' slots, data/stage.py).

Layout of a global batch (rank-major): rank 0's micro-steps 0..grad_accum-1, then rank 1's,
and so on. Concatenating ``rank_slice(step, r, m)`` in the order (rank, micro_step) - for r
in ranks, for m in micro-steps - reproduces ``global_batch(step)``, and each rank's
whole share of a step is one contiguous block of micro_batch * grad_accum positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from rayattr.data.errors import DataError
from rayattr.data.permutation import to_position


def epoch_permutation(n: int, epoch: int, seed: int) -> np.ndarray:
    """The seeded order of sample positions 0..n-1 in one epoch, whole (O(n): for tests and
    small tables; the plan itself evaluates only the slots it needs)."""
    return to_position(np.arange(n), n, seed, epoch)


def epoch_order(n: int, epochs: int, seed: int) -> np.ndarray:
    """(epochs, n) array: row e is the sample order of epoch e (a permutation of 0..n-1)."""
    if n < 1 or epochs < 1:
        raise DataError(f"epoch_order needs n >= 1 and epochs >= 1, got n={n}, epochs={epochs}")
    return np.stack([epoch_permutation(n, e, seed) for e in range(epochs)])


class Owners(NamedTuple):
    """Who processes each position of a global batch."""

    ranks: np.ndarray  # (G,) rank that processes the sample
    positions: np.ndarray  # (G,) index in that rank's share of the step: micro_step * micro_batch + offset


@dataclass(frozen=True)
class StepLayout:
    """Everything a step record needs about one optimizer step."""

    step: int  # global optimizer step, 0-based
    epoch: int  # epoch the step belongs to
    indices: np.ndarray  # (G,) sample positions (rows of the dataset) in global-batch order
    ranks: np.ndarray  # (G,) rank processing each sample
    micro_steps: np.ndarray  # (G,) accumulation micro-step on that rank
    offsets: np.ndarray  # (G,) row inside that micro-batch

    def sample_ids(self, ids: np.ndarray) -> np.ndarray:
        """The dataset's sample ids (e.g. TokenizedDataset.ids) in global-batch order."""
        return np.asarray(ids)[self.indices]


@dataclass(frozen=True)
class BatchPlan:
    """Deterministic step -> samples assignment for all ranks (see module docstring)."""

    n_samples: int  # rows in the training dataset
    micro_batch: int  # samples per rank per forward/backward
    world_size: int = 1  # data-parallel ranks
    grad_accum: int = 1  # micro-steps accumulated per optimizer step
    epochs: int = 1  # passes over the data
    seed: int = 0  # seeds every epoch's permutation

    def __post_init__(self) -> None:
        for name in ("n_samples", "micro_batch", "world_size", "grad_accum", "epochs"):
            if getattr(self, name) < 1:
                raise DataError(f"BatchPlan.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_samples < self.global_batch_size:
            raise DataError(
                f"BatchPlan: {self.n_samples} samples cannot fill one global batch of "
                f"{self.global_batch_size} (micro_batch {self.micro_batch} x world_size "
                f"{self.world_size} x grad_accum {self.grad_accum})")

    @property
    def global_batch_size(self) -> int:
        """G = micro_batch * world_size * grad_accum samples per optimizer step."""
        return self.micro_batch * self.world_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return self.n_samples // self.global_batch_size

    @property
    def num_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def dropped_per_epoch(self) -> int:
        """Samples left out of each epoch by dropping its last incomplete batch."""
        return self.n_samples - self.steps_per_epoch * self.global_batch_size

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.num_steps:
            raise DataError(f"step {step} is outside the plan's {self.num_steps} steps")

    def epoch_of(self, step: int) -> int:
        self._check_step(step)
        return step // self.steps_per_epoch

    def global_batch(self, step: int) -> np.ndarray:
        """(G,) sample positions of one step, in the rank-major layout."""
        epoch = self.epoch_of(step)
        start = (step % self.steps_per_epoch) * self.global_batch_size
        return to_position(np.arange(start, start + self.global_batch_size), self.n_samples, self.seed, epoch)

    def rank_indices(self, step: int, rank: int) -> np.ndarray:
        """All samples rank processes in step: its micro-batches 0..grad_accum-1 concatenated."""
        if not 0 <= rank < self.world_size:
            raise DataError(f"rank {rank} is outside world_size {self.world_size}")
        share = self.micro_batch * self.grad_accum
        return self.global_batch(step)[rank * share:(rank + 1) * share]

    def rank_slice(self, step: int, rank: int, micro_step: int) -> np.ndarray:
        """(micro_batch,) samples rank processes in micro_step of step."""
        if not 0 <= micro_step < self.grad_accum:
            raise DataError(f"micro_step {micro_step} is outside grad_accum {self.grad_accum}")
        start = micro_step * self.micro_batch
        return self.rank_indices(step, rank)[start:start + self.micro_batch]

    def owner(self, step: int) -> Owners:
        """Per global-batch position: the rank that processes it and its position in that
        rank's share (micro_step = position // micro_batch). Same for every step."""
        self._check_step(step)
        share = self.micro_batch * self.grad_accum
        p = np.arange(self.global_batch_size)
        return Owners(ranks=p // share, positions=p % share)

    def layout(self, step: int) -> StepLayout:
        """Epoch, samples and (rank, micro_step, offset) of every sample of one step."""
        ranks, positions = self.owner(step)
        return StepLayout(step=step, epoch=self.epoch_of(step), indices=self.global_batch(step),
                          ranks=ranks, micro_steps=positions // self.micro_batch,
                          offsets=positions % self.micro_batch)
