"""Commit entries: one small JSON object per committed shard, written after the shard.

Object stores cannot append, so a rank's commit log is the set of entries under
commits/<kind>/rNNNN/. Readers list entries, never data directories: a shard without an entry
(a crash between the two PUTs) is invisible and is overwritten or removed by the next writer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import StoreError
from .storage import Storage


def sha256_hex(data) -> str:
    """Checksum of a stored object, as commit entries record it."""
    return hashlib.sha256(data).hexdigest()


SHARD_FORMAT = "arrow-ipc/1"
RECORDS_FORMAT = "parquet/1"


@dataclass
class Part:
    """A byte range of a shard with its own checksum (header, one step's batch, footer)."""

    offset: int  # first byte
    length: int  # number of bytes
    sha256: str  # hex digest of those bytes
    step: int = -1  # global step of a batch part; -1 for header/footer
    batch: int = -1  # record-batch index inside the IPC file; -1 for header/footer
    rows: int = 0  # rows in that batch

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class ShardCommit:
    """Everything a reader needs to fetch and verify a shard without listing data."""

    shard: str  # object path relative to the run directory
    kind: str  # gradient kind ("train", "curvature") or "steps" for step records
    rank: int  # writing rank (-1 for step records)
    step_first: int  # first step in the shard
    step_last: int  # last step in the shard (inclusive)
    rows: int  # total rows
    bytes: int  # shard size in bytes
    sha256: str  # hex digest of the whole shard
    committed_at: float  # writer's wall clock (seconds since epoch); informative only
    epoch: int  # its writer's epoch (store/epochs.py, from 1)
    writer: str = ""  # id of the writer session that produced it
    seq: int = 0  # how many commits its writer made before it: orders one writer's re-writes of a step
    format: str = SHARD_FORMAT  # shard encoding
    dtype: str = ""  # storage dtype of gradient columns
    layers: dict[str, int] = field(default_factory=dict)  # layer name -> projected dim p
    header: Part | None = None  # IPC magic + schema message
    footer: Part | None = None  # IPC footer (schema + block index) + trailing magic
    steps: list[Part] = field(default_factory=list)  # one part per step, in step order

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "ShardCommit":
        try:
            d: dict[str, Any] = json.loads(data)
            d["header"] = Part(**d["header"]) if d.get("header") else None
            d["footer"] = Part(**d["footer"]) if d.get("footer") else None
            d["steps"] = [Part(**p) for p in d.get("steps", [])]
            return cls(**d)
        except (ValueError, TypeError, KeyError) as err:
            raise StoreError(f"unreadable commit entry {where}: {err}") from None


def write_commit(storage: Storage, rel: str, entry: ShardCommit) -> None:
    storage.put_bytes(rel, entry.to_json())


def latest_per_step(entries: list[ShardCommit]) -> dict[int, tuple[ShardCommit, Part | None]]:
    """step -> (entry, part); of entries holding the same step, the one whose writer registered
    later (the larger epoch, store/epochs.py) wins, never the later wall clock; within one
    epoch, the larger object name, so every reader agrees."""
    out: dict[int, tuple[ShardCommit, Part | None]] = {}
    for e in sorted(entries, key=lambda e: (e.epoch, e.shard)):
        if e.steps:
            for p in e.steps:
                out[p.step] = (e, p)
        else:
            for s in range(e.step_first, e.step_last + 1):
                out[s] = (e, None)
    return out
