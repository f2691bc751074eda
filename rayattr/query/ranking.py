"""From per-occurrence scores to answers: samples ranked by their summed value, sources ranked.

`Ranking` takes the occurrences block by block, in step order, as query/scoring.py streams
them, and holds a bounded amount of memory whatever the run's size (see its docstring);
`rank_samples` and `rank_sources` rank occurrences already in memory the same way.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from typing import Callable, Iterable

import numpy as np

from rayattr.query.errors import QueryError
from rayattr.query.scoring import OccurrenceScores

PART_BYTES = 16 << 20
"""Occurrence records (sample id, step, source, Q scores and Q standard errors) ranked at
once: the occurrences are cut into partitions of about this size by a hash of the sample id."""
SPILL_BUFFER = 16 << 20
"""Records waiting in memory for their partition's file."""


def sample_totals(sample_ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct sample ids, their value summed over occurrences, and each occurrence's sample index."""
    ids, inverse = np.unique(sample_ids, return_inverse=True)
    return ids, np.bincount(inverse, weights=scores, minlength=len(ids)), inverse


def _top(values: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Indices of the k largest (or smallest) values, best first; only strictly positive
    (negative) ones, so a "helpful" answer never lists a sample that hurt."""
    keep = np.flatnonzero(values > 0 if largest else values < 0)
    if keep.size == 0 or k <= 0:
        return keep[:0]
    order = np.argsort(-values[keep] if largest else values[keep], kind="stable")
    return keep[order[:k]]


TextLookup = Callable[[np.ndarray], list]
"""Texts of the given training sample ids, in their order (None where unknown)."""

LISTS = (("helpful", True), ("harmful", False))


class Ranking:
    """The k most helpful and most harmful samples of each score column, and (by_source) the
    sources' totals, from occurrence blocks given in step order.

    A sample's score is its occurrences' scores summed over every epoch, and its occurrences
    lie in different blocks, so no per-block top-k is exact; holding a total per sample would
    be exact but grows with the corpus. So the blocks' records are cut by a hash of the sample
    id into partitions of about PART_BYTES (one partition, kept in memory, for runs up to that
    size; else each partition appended to a file in a temporary directory): every occurrence
    of a sample lands in the same partition, in step order. Each partition is then ranked
    alone, exactly as the whole run would be, and the global top k of each list is the top k
    of the partitions' top k under the same order (score, then sample id). Per-source totals
    are added occurrence by occurrence in step order (np.add.at) during the stream.

    Memory: one partition (PART_BYTES of records and about as much again while it is ranked),
    SPILL_BUFFER of records waiting to be written, k rows per list and column, and a few
    numbers per source; temporary disk: (20 + 16 Q) bytes per occurrence for Q score columns,
    only when the run holds more than one partition. The sums are float64 and added in the
    same order as over all occurrences at once, so the rows equal rank_samples' and
    rank_sources' on the concatenated occurrences bit for bit.
    """

    def __init__(self, columns: int, k: int, occurrences: int, with_se: bool, by_source: bool = False,
                 part_bytes: int = PART_BYTES, spill_buffer: int = SPILL_BUFFER, tmp_dir: str | None = None):
        self.columns, self.k, self.with_se, self.by_source = columns, k, with_se, by_source
        fields = [("id", "<i8"), ("step", "<i8"), ("src", "<i4"), ("score", "<f8", (columns,))]
        self.dtype = np.dtype(fields + ([("se", "<f8", (columns,))] if with_se else []))
        self._need = max(0, occurrences) * self.dtype.itemsize
        self.parts = max(1, math.ceil(self._need / part_bytes))
        self.spill_buffer, self.tmp_dir = spill_buffer, tmp_dir
        self.names: list[str] = []  # source names by code, in order of first appearance
        self._codes: dict[str, int] = {}
        self.src_total = np.zeros((0, columns))
        self.src_occ = np.zeros(0, np.int64)
        self.occurrences = 0
        self._buffers: list[list[np.ndarray]] = [[] for _ in range(self.parts)]
        self._buffered = 0
        self._dir: str | None = None

    def __enter__(self) -> "Ranking":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._buffers = [[] for _ in range(self.parts)]
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _source_codes(self, sources: np.ndarray) -> np.ndarray:
        names, inverse = np.unique(sources.astype(str), return_inverse=True)
        for name in names:
            if name not in self._codes:
                self._codes[str(name)] = len(self.names)
                self.names.append(str(name))
        grow = len(self.names) - len(self.src_occ)
        if grow:
            self.src_total = np.concatenate([self.src_total, np.zeros((grow, self.columns))])
            self.src_occ = np.concatenate([self.src_occ, np.zeros(grow, np.int64)])
        return np.array([self._codes[str(n)] for n in names], np.int32)[inverse.reshape(-1)]

    def add(self, block: OccurrenceScores) -> None:
        """The next occurrences in step order (scores (n, columns), se likewise if with_se)."""
        n = len(block)
        if n == 0:
            return
        codes = self._source_codes(block.sources)
        scores = np.asarray(block.scores, np.float64).reshape(n, self.columns)
        if self.by_source:
            # unbuffered and in order: each source's total is added occurrence by occurrence,
            # as np.bincount over all occurrences at once adds it
            np.add.at(self.src_total, codes, scores)
            self.src_occ += np.bincount(codes, minlength=len(self.names))
        rec = np.empty(n, self.dtype)
        rec["id"], rec["step"], rec["src"], rec["score"] = block.sample_ids, block.steps, codes, scores
        if self.with_se:
            rec["se"] = np.asarray(block.se, np.float64).reshape(n, self.columns)
        self.occurrences += n
        if self.parts == 1:
            self._buffers[0].append(rec)
            return
        part = _partition(rec["id"], self.parts)
        order = np.argsort(part, kind="stable")  # stable: each partition keeps step order
        ends = np.cumsum(np.bincount(part, minlength=self.parts))
        rec = rec[order]
        for p in np.flatnonzero(np.diff(ends, prepend=0)):
            self._buffers[p].append(rec[(ends[p - 1] if p else 0):ends[p]])
        self._buffered += rec.nbytes
        if self._buffered >= self.spill_buffer:
            self._spill()

    def _spill(self) -> None:
        try:
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="rayattr-query-", dir=self.tmp_dir)
            for p, pending in enumerate(self._buffers):
                if pending:
                    with open(os.path.join(self._dir, f"{p}.bin"), "ab") as f:
                        for r in pending:
                            r.tofile(f)
        except OSError as err:  # a full or read-only disk: the user's to fix
            where = self._dir or self.tmp_dir or tempfile.gettempdir()
            raise QueryError(f"ranking this run's occurrences needs about {self._need / 1e9:.2g} GB of "
                             f"temporary files in {where} ({err.strerror or err}); set TMPDIR to a "
                             "directory with room") from None
        self._buffers = [[] for _ in range(self.parts)]
        self._buffered = 0

    def _partitions(self) -> Iterable[np.ndarray]:
        if self.parts == 1:
            yield np.concatenate(self._buffers[0]) if self._buffers[0] else np.empty(0, self.dtype)
            self._buffers[0] = []
            return
        self._spill()
        for p in range(self.parts):
            path = os.path.join(self._dir, f"{p}.bin")
            if os.path.exists(path):
                yield np.fromfile(path, dtype=self.dtype)
                os.remove(path)

    def finish(self, texts: TextLookup | None = None) -> list[dict]:
        """Per score column: {"helpful": rows, "harmful": rows, "sources": rows or None}, the
        rows as rank_samples and rank_sources give them."""
        best: list[dict[str, list[dict]]] = [{key: [] for key, _ in LISTS} for _ in range(self.columns)]
        src_samples = np.zeros(len(self.names), np.int64)
        for rec in self._partitions():
            if not len(rec):
                continue
            ids, inverse = np.unique(rec["id"], return_inverse=True)
            inverse = inverse.reshape(-1)
            # each sample's occurrences, in step order: order[starts[j]:starts[j + 1]]
            order = np.argsort(inverse, kind="stable")
            starts = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=len(ids)))])
            if self.by_source:  # distinct samples per source (a sample lies in one partition)
                pairs = np.unique(inverse.astype(np.int64) * len(self.names) + rec["src"])
                src_samples += np.bincount(pairs % len(self.names), minlength=len(self.names))
            for c in range(self.columns):
                column = np.ascontiguousarray(rec["score"][:, c])
                se = np.ascontiguousarray(rec["se"][:, c]) if self.with_se else None
                totals = np.bincount(inverse, weights=column, minlength=len(ids))
                for key, largest in LISTS:
                    rows = [_row(ids[j], order[starts[j]:starts[j + 1]], totals[j], column, se, rec, self.names,
                                 largest) for j in _top(totals, self.k, largest)]
                    merged = best[c][key] + rows
                    merged.sort(key=(lambda r: (-r["score"], r["sample_id"])) if largest
                                else (lambda r: (r["score"], r["sample_id"])))
                    best[c][key] = merged[:self.k]
        self.close()
        out = []
        for c in range(self.columns):
            lists = {}
            for key, _ in LISTS:
                rows = best[c][key]
                if texts is not None and rows:  # only the rows shown are fetched
                    for row, text in zip(rows, texts(np.array([r["sample_id"] for r in rows]))):
                        row["text"] = text
                lists[key] = rows
            lists["sources"] = self._sources(c, src_samples) if self.by_source else None
            out.append(lists)
        return out

    def _sources(self, c: int, n_samples: np.ndarray) -> list[dict]:
        rows = [{"source": name, "score": float(self.src_total[i, c]), "n_samples": int(n_samples[i]),
                 "n_occurrences": int(self.src_occ[i]),
                 "score_per_sample": float(self.src_total[i, c] / max(1, n_samples[i]))}
                for i, name in sorted(enumerate(self.names), key=lambda t: t[1])]
        return sorted(rows, key=lambda r: -r["score"])


def _partition(ids: np.ndarray, parts: int) -> np.ndarray:
    """A partition per sample id (Fibonacci hashing: consecutive ids spread evenly)."""
    h = ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((h >> np.uint64(32)) % np.uint64(parts)).astype(np.intp)


def _row(sample_id, mine: np.ndarray, total: float, column: np.ndarray, se: np.ndarray | None,
         rec: np.ndarray, names: list[str], largest: bool) -> dict:
    """One listed sample: `mine` are its occurrences (in step order); `step` is the one that
    contributed most in the row's direction; se adds the occurrences' in quadrature, and
    within_noise says |score| < 2·se."""
    best = mine[np.argmax(column[mine]) if largest else np.argmin(column[mine])]
    row_se = float(np.sqrt(np.sum(se[mine] ** 2))) if se is not None else None
    return {"sample_id": int(sample_id), "source": names[rec["src"][best]], "step": int(rec["step"][best]),
            "score": float(total), "se": row_se,
            "within_noise": None if row_se is None else bool(abs(total) < 2 * row_se),
            "n_occurrences": int(mine.size)}


def _one_column(occ: OccurrenceScores, column: np.ndarray, se: np.ndarray | None) -> OccurrenceScores:
    return OccurrenceScores(occ.sample_ids, occ.sources, occ.steps, np.asarray(column)[:, None],
                            None if se is None else np.asarray(se)[:, None])


def rank_samples(occ: OccurrenceScores, column: np.ndarray, k: int,
                 texts: TextLookup | None = None, se: np.ndarray | None = None) -> dict[str, list[dict]]:
    """The k most helpful and k most harmful training samples for one score column.

    A sample's score is its value summed over its occurrences (all epochs); `step` is the
    occurrence that contributed most in the row's direction. With `se` (per occurrence), a
    row's se adds its occurrences' in quadrature, and within_noise says |score| < 2·se.
    """
    with Ranking(1, k, len(occ), se is not None) as ranking:
        ranking.add(_one_column(occ, column, se))
        lists = ranking.finish(texts)[0]
    return {key: lists[key] for key, _ in LISTS}


def rank_sources(occ: OccurrenceScores, column: np.ndarray) -> list[dict]:
    """Sources ranked by their summed score for one column (most helpful first)."""
    with Ranking(1, 0, len(occ), False, by_source=True) as ranking:
        ranking.add(_one_column(occ, column, None))
        return ranking.finish()[0]["sources"]
