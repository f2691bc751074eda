"""A step's global batch from every rank's own samples.

Each rank knows only the samples it trained on; the step record holds the whole batch in
rank-major order (rank 0's samples, then rank 1's, ...: the layout of rayattr/data/batching.py),
and each row's position in it, so every rank gathers every rank's ids (one small collective),
unless the caller read the whole batch itself (the built-in job, from its token shards).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch.distributed as dist

from rayattr.errors import UsageError


@dataclass
class GlobalBatch:
    sample_ids: list[int]  # the step's whole batch, rank-major
    sources: list[str]
    ranks: list[int]  # rank that trained each sample
    offset: int  # position of this rank's first sample in the batch

    @property
    def size(self) -> int:
        return len(self.sample_ids)


def gather_batch(sample_ids: list[int], sources: list[str], rank: int, world_size: int) -> GlobalBatch:
    """Collective when world_size > 1: every rank calls it once per step."""
    if world_size == 1:
        return GlobalBatch(list(sample_ids), list(sources), [0] * len(sample_ids), 0)
    parts: list = [None] * world_size
    dist.all_gather_object(parts, (list(sample_ids), list(sources)))
    ids, srcs, ranks, offset = [], [], [], 0
    for r, (i, s) in enumerate(parts):
        if r == rank:
            offset = len(ids)
        ids += i
        srcs += s
        ranks += [r] * len(i)
    return GlobalBatch(ids, srcs, ranks, offset)


def known_batch(all_ids: Sequence[int], all_sources: Sequence[str], sample_ids: list[int], rank: int,
                world_size: int) -> GlobalBatch:
    """The step's global batch as the caller read it (rank-major, every rank the same share),
    checked against this rank's own samples: no collective."""
    ids, srcs = [int(i) for i in all_ids], [str(s) for s in all_sources]
    share = len(sample_ids)
    offset = rank * share
    if len(ids) != share * world_size or len(srcs) != len(ids) or ids[offset:offset + share] != list(sample_ids):
        raise UsageError(f"rank {rank}: the global batch given ({len(ids)} ids) does not hold this rank's "
                         f"{share} samples at position {offset} of {world_size} equal shares")
    return GlobalBatch(ids, srcs, [r for r in range(world_size) for _ in range(share)], offset)


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """This process's rank and the world size: given, else torch.distributed's (Ray Train and
    the deepspeed launcher both initialise it), else a single process."""
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if rank is not None or world_size is not None:
        raise UsageError("give both rank and world_size, or neither (then torch.distributed's are used)")
    return 0, 1
