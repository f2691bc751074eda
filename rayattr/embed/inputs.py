"""What every step of a segment must hold before it is embedded (docs/method.md §4).

A step's rows are its record's: the same (sample id, rank) pairs in the train rows and, for
AdamW, the update rows; with sampled curvature, rows of every rank that trained on the step.
A step that came back short (a rank's shard or commit entry missing, a writer still open, a
kind not written) refuses the segment with an IncompleteInputError naming the step, the rank,
the kind and the writer still open, instead of embedding part of the step.

The records' per-sample lists are kept as one digest per step (not the lists: a segment holds
steps × global batch of them); a mismatch re-reads that one record to say what differs.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np

from rayattr.errors import IncompleteInputError
from rayattr.store.layout import CURVATURE_KIND, CURVATURE_UPDATE_KIND

SAMPLED_KINDS = (CURVATURE_KIND, CURVATURE_UPDATE_KIND)  # rows drawn per rank, not the batch's samples


def rows_digest(sample_ids: Sequence[int], ranks: Sequence[int] | None) -> bytes:
    """Digest of a step's rows as a multiset of (rank, sample id) pairs (ranks None: ids only),
    whatever their order."""
    ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
    rk = np.zeros_like(ids) if ranks is None else np.asarray(ranks, dtype=np.int64).reshape(-1)
    order = np.lexsort((ids, rk))
    return hashlib.blake2b(np.stack([rk[order], ids[order]]).tobytes(), digest_size=16).digest()


class SegmentInputs:
    """The rows every step of [start, end) must come back with, from its step records."""

    def __init__(self, run, segment: int, start: int, end: int, records: Iterable):
        self.run, self.segment, self.start, self.end = run, segment, start, end
        self.pairs: dict[int, bytes] = {}  # (rank, id) digest of the record's rows
        self.ids: dict[int, bytes] = {}  # id digest (rows written by a segment, not a rank)
        self.ranks: dict[int, frozenset] = {}  # ranks that trained on the step
        interned: dict[frozenset, frozenset] = {}
        for r in records:
            self.pairs[r.step] = rows_digest(r.sample_ids, r.ranks)
            self.ids[r.step] = rows_digest(r.sample_ids, None)
            ranks = frozenset(int(x) for x in r.ranks)
            self.ranks[r.step] = interned.setdefault(ranks, ranks)
        missing = [t for t in range(start, end) if t not in self.pairs]
        if missing:
            raise IncompleteInputError(f"segment {segment}: no step records for steps {_steps(missing)} "
                                       f"in {run.uri}")

    def check(self, kind: str, a: int, b: int, batches: Sequence, reader, by_rank: bool = True) -> None:
        """The batches a reader returned for steps [a, b) of `kind`: every step there, each with
        exactly its record's rows ((rank, id) pairs; ids only when not `by_rank`; rows of every
        rank for the sampled kinds, whose rows are drawn, not the batch's)."""
        got = {batch.step: batch for batch in batches}
        for t in range(a, b):
            batch = got.get(t)
            if batch is None or len(batch) == 0:
                self._refuse(kind, t, reader.why_missing(t, self.ranks[t] if by_rank else ()))
            if kind in SAMPLED_KINDS:
                lacking = self.ranks[t] - set(batch.ranks.tolist())
                if lacking:
                    self._refuse(kind, t, reader.why_missing(t, lacking))
                continue
            digest = (rows_digest(batch.sample_ids.numpy(), batch.ranks.numpy()) if by_rank
                      else rows_digest(batch.sample_ids.numpy(), None))
            if digest != (self.pairs if by_rank else self.ids)[t]:
                self._refuse(kind, t, self._difference(t, batch, reader, by_rank))

    def _difference(self, step: int, batch, reader, by_rank: bool) -> str:
        """What differs between a step's rows and its record, rank by rank."""
        (record,) = self.run.step_records(step, step + 1)
        want = _by_rank(record.sample_ids, record.ranks if by_rank else None)
        have = _by_rank(batch.sample_ids.tolist(), batch.ranks.tolist() if by_rank else None)
        out = []
        for r in sorted(set(want) | set(have)):
            w, h = sorted(want.get(r, [])), sorted(have.get(r, []))
            if w != h:
                who = f"rank {r}" if by_rank else "its rows"
                extra = sorted(set(h) - set(w))[:5]
                lost = sorted(set(w) - set(h))[:5]
                out.append(f"{who} has {len(h)} rows, its record {len(w)}"
                           + (f" (missing ids {lost})" if lost else "") + (f" (unrecorded ids {extra})" if extra else ""))
        if by_rank:
            lacking = [r for r in want if not have.get(r)]
            if lacking:
                out.append(reader.why_missing(step, lacking))
        return "; ".join(out) or "its rows differ from its record"

    def _refuse(self, kind: str, step: int, why: str):
        raise IncompleteInputError(f"segment {self.segment}: step {step} is incomplete in the {kind!r} rows of "
                                   f"{self.run.uri}: {why}. The segment is not embedded from part of its input")


def _by_rank(ids: Sequence[int], ranks: Sequence[int] | None) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, r in zip(ids, ranks if ranks is not None else [0] * len(ids)):
        out.setdefault(int(r), []).append(int(i))
    return out


def _steps(steps: list[int]) -> str:
    return ", ".join(map(str, steps[:5])) + (f" … ({len(steps)} in all)" if len(steps) > 5 else "")
