"""Writer epochs: fencing a zombie writer (a restarted rank's predecessor that is still running).

Every GradientWriter claims the next epoch of its (kind, rank) with the store's conditional
create, epochs/<kind>/rNNNN/eNNNNNNNN, so epochs are unique and a writer registered
later has a larger one: never decided by a clock. The claim records `from`, the first step
the new writer may write (one past what was committed when it started). The epoch is part of
the writer's object names (layout.shard_path, layout.commit_path), so two writers of one rank
never write the same key, and readers resolve entries by epoch:

  * an entry of epoch e is visible only if it starts before the `from` of every later epoch
    of its rank: whatever a zombie commits after its successor started is ignored;
  * of two visible entries holding the same step, the later epoch's wins (commits.latest_per_step).

A reader lists the entries before the claims, so an entry committed after a claim is always
judged against it.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import socket
import time

from . import layout
from .storage import Storage

_CLAIM = re.compile(r"^e(\d+)$")
_RANK = re.compile(r"^r(\d+)$")
MAX_CLAIM_TRIES = 64


def _parse(rel: str) -> int | None:
    m = _CLAIM.match(posixpath.basename(rel))
    return int(m[1]) if m else None


def claim(storage: Storage, kind: str, rank: int, first_step: int, writer: str) -> int:
    """Claim the next epoch of (kind, rank) for `writer`, which may write steps >= first_step;
    returns it. Two writers claiming at once get different epochs."""
    for _ in range(MAX_CLAIM_TRIES):
        taken = [e for e in map(_parse, storage.find(layout.epoch_dir(kind, rank))) if e is not None]
        epoch = max(taken, default=0) + 1
        info = {"epoch": epoch, "from": int(first_step), "writer": writer, "rank": rank,
                "kind": kind, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        try:
            storage.create_bytes(layout.epoch_path(kind, rank, epoch), json.dumps(info).encode())
            return epoch
        except FileExistsError:
            continue  # another writer of this rank claimed it first: take the next one
    raise RuntimeError(f"could not claim a writer epoch for rank {rank} ({kind}) "
                       f"in {MAX_CLAIM_TRIES} tries")


def claims(storage: Storage, kind: str) -> dict[int, dict[int, int]]:
    """rank -> {epoch: first step it may write} of the claimed epochs of `kind`, for the ranks
    that had more than one writer (one LIST; a rank with a single writer has nothing to fence,
    so the common case reads no claim)."""
    by_rank: dict[str, list[str]] = {}
    for rel in storage.find(layout.epoch_dir(kind)):
        if _parse(rel) is not None:
            by_rank.setdefault(posixpath.dirname(rel), []).append(rel)
    rels = [r for group in by_rank.values() if len(group) > 1 for r in group]
    out: dict[int, dict[int, int]] = {}
    if not rels:
        return out
    for rel, raw in zip(rels, storage.get_many(rels)):
        info = json.loads(raw)
        out.setdefault(int(info["rank"]), {})[int(info["epoch"])] = int(info["from"])
    return out


def later_than(own: dict[int, int], epoch: int) -> dict[int, int]:
    return {e: f for e, f in own.items() if e > epoch}


def fence(entries: list, by_rank: dict[int, dict[int, int]]) -> list:
    """The entries a later epoch of their rank has not fenced off (see the module docstring)."""
    out = []
    for e in entries:
        later = later_than(by_rank.get(e.rank, {}), e.epoch)
        if all(e.step_first < first for first in later.values()):
            out.append(e)
    return out


def latest(storage: Storage, kind: str) -> dict[int, int]:
    """rank -> the latest epoch claimed of `kind` (one LIST; no claim is read)."""
    out: dict[int, int] = {}
    for rel in storage.find(layout.epoch_dir(kind)):
        epoch, rank = _parse(rel), _RANK.match(posixpath.basename(posixpath.dirname(rel)))
        if epoch is not None and rank:
            out[int(rank[1])] = max(out.get(int(rank[1]), 0), epoch)
    return out


def read_claim(storage: Storage, kind: str, rank: int, epoch: int) -> dict | None:
    """What a claim records (writer, from, host, pid, time); None if it is gone."""
    try:
        return json.loads(storage.get_bytes(layout.epoch_path(kind, rank, epoch)))
    except FileNotFoundError:
        return None
