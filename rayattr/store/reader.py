"""GradientReader: committed gradients of any step range, all ranks merged in batch order."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from . import layout
from .commits import Part, ShardCommit, latest_per_step
from .index import load_entries
from .registrations import current, describe_writer
from .errors import StoreError
from .run import Run
from .shard import column_to_tensor, merge_ranges, open_sparse, sha256_hex

_NO_POSITION = np.int64(1) << np.int64(62)  # sorts rows without a position after the others


@dataclass
class StepBatch:
    """All committed rows of one step, in global-batch order."""

    step: int  # global step
    sample_ids: torch.Tensor  # (B,) int64
    sources: list[str]  # (B,) source of each row
    positions: torch.Tensor  # (B,) int64 index in the global batch (-1 if the writer gave none)
    ranks: torch.Tensor  # (B,) int64 rank that wrote each row
    grads: dict[str, torch.Tensor]  # layer -> (B, p) tensor in the requested dtype

    def __len__(self) -> int:
        return len(self.sample_ids)


WINDOW_BYTES = 128 << 20  # bytes a reader fetches per round trip (one window decoded, one prefetched)


@dataclass
class _Slot:
    """Where one rank's rows of one step live."""

    rank: int
    entry: ShardCommit
    part: Part


class GradientReader:
    """Read-side view of one gradient kind of a run.

    A step is visible once every rank still writing (registered "open", or listed in
    expected_ranks) has committed through it; ranks whose writer closed cleanly no longer hold
    the others back. Call refresh() to pick up new commits while training runs.
    """

    def __init__(self, run: Run, kind: str = "train", projection: dict | None = None,
                 expected_ranks: Sequence[int] | None = None, window_bytes: int = WINDOW_BYTES,
                 prefetch: bool = True, step_range: tuple[int, int | None] | None = None):
        self.run = run
        self.kind = layout.check_kind(kind)
        run.check_compatible(None, projection)
        self.expected_ranks = None if expected_ranks is None else sorted(set(expected_ranks))
        self.window_bytes = window_bytes  # bytes fetched per round trip (and prefetched ahead)
        self.prefetch = prefetch
        # Steps [start, end) this reader serves: it opens only the index objects that cover
        # them (store/index.py); None = every step
        self.step_range = tuple(step_range) if step_range is not None else (0, None)
        self._storage = run._storage
        self.refresh()

    # -- index -------------------------------------------------------------------------------
    def refresh(self) -> None:
        entries = load_entries(self._storage, self.kind, step_start=self.step_range[0],
                               step_end=self.step_range[1])
        # rank -> its latest writer's registration (status, writer, host, pid): a zombie's
        # late one never hides or shows a rank's steps
        regs = current(self._storage, self.kind)
        self.registrations = regs
        status = {rank: r["status"] for rank, r in regs.items()}

        by_rank: dict[int, list[ShardCommit]] = {}
        for e in entries:
            by_rank.setdefault(e.rank, []).append(e)
        ranks = set(by_rank) | set(status) | set(self.expected_ranks or ())
        watermark = {r: max((e.step_last for e in by_rank.get(r, [])), default=-1) for r in ranks}
        # Ranks still writing, with the step range each may still write (None = all steps).
        waiting = [(watermark[r], (regs.get(r) or {}).get("step_range"))
                   for r in ranks if status.get(r) != "closed"]

        def visible(step: int) -> bool:
            return all(mark >= step for mark, rng in waiting
                       if rng is None or rng[0] <= step < rng[1])

        index: dict[int, list[_Slot]] = {}
        for r in sorted(by_rank):
            for step, (entry, part) in latest_per_step(by_rank[r]).items():
                if visible(step):
                    index.setdefault(step, []).append(_Slot(r, entry, part))
        self._index = index
        self._by_rank = by_rank
        self._watermark = watermark
        self.ranks = sorted(ranks)
        written: dict[str, int] = {}
        for e in entries:
            written.update(e.layers)
        # Layers this kind holds (default for reads); the manifest's layers are also "known",
        # so asking for one this kind lacks names the shard instead of "unknown layer".
        self.layers: dict[str, int] = written or dict(self.run.layers() or {})
        self._known = {**(self.run.layers() or {}), **written}

    def committed_steps(self) -> list[int]:
        """Sorted steps whose rows are committed by all ranks that write them (inside the
        reader's step_range)."""
        a, b = self.step_range
        return sorted(s for s in self._index if s >= a and (b is None or s < b))

    def rows(self) -> int:
        """Rows of the committed steps, from their commit entries (nothing is read)."""
        return sum(slot.part.rows for s in self.committed_steps() for slot in self._index[s])

    def open_writers(self) -> list[dict]:
        """Registrations of this kind's writers still marked "open", by rank."""
        return [self.registrations[r] for r in sorted(self.registrations)
                if self.registrations[r].get("status") != "closed"]

    def why_missing(self, step: int, ranks: Sequence[int]) -> str:
        """Why `step` holds no (or not all) rows of `ranks`: which rank committed nothing for it,
        and which writer that is still open hides it."""
        why = []
        for r in sorted(set(int(x) for x in ranks)):
            held = any(e.step_first <= step <= e.step_last and (not e.steps or any(p.step == step for p in e.steps))
                       for e in self._by_rank.get(r, []))
            reg = self.registrations.get(r)
            if not held:
                what = (f"rank {r} has not committed it: its writer {describe_writer(reg)} is still open"
                        if reg is not None and reg.get("status") != "closed" else
                        f"rank {r} committed no rows for it (a missing shard or commit entry)")
                why.append(what)
        if not why:  # every rank committed it, but a writer still open holds the step back
            why = [f"it is hidden while writer {describe_writer(reg)} (rank {reg.get('rank')}) is still open, "
                   f"committed through step {self._watermark.get(int(reg.get('rank', -1)), -1)}"
                   for reg in self.open_writers()] or ["its rows are not committed"]
        return "; ".join(why)

    # -- reading -----------------------------------------------------------------------------
    def _check_layers(self, layers: Sequence[str] | None) -> list[str]:
        if layers is None:
            return list(self.layers)
        if isinstance(layers, str):
            layers = [layers]
        for name in layers:
            if name not in self._known:
                raise StoreError(f"unknown layer '{name}' in run '{self.run.run_id}' "
                                 f"({self.kind}); known layers: {sorted(self._known)}")
        return list(layers)

    def _windows(self, steps: list[int]) -> list[list[int]]:
        windows, cur, size = [], [], 0
        for s in steps:
            if cur and size >= self.window_bytes:
                windows.append(cur)
                cur, size = [], 0
            cur.append(s)
            size += sum(slot.part.length for slot in self._index[s])
        if cur:
            windows.append(cur)
        return windows

    def _fetch(self, steps: list[int]) -> dict[str, pa.ipc.RecordBatchFileReader]:
        """Fetch (concurrently) and verify the byte ranges these steps need; shard -> reader."""
        needed: dict[str, tuple[ShardCommit, list[Part]]] = {}
        for s in steps:
            for slot in self._index[s]:
                needed.setdefault(slot.entry.shard, (slot.entry, []))[1].append(slot.part)
        rels, starts, ends, checks = [], [], [], []
        for shard, (entry, parts) in needed.items():
            if len(parts) == len(entry.steps):  # whole shard: one GET, one checksum
                ranges = [(0, entry.bytes)]
                checks.append([(shard, 0, entry.bytes, entry.sha256, "shard")])
            else:
                wanted = [entry.header, entry.footer] + parts
                ranges = merge_ranges(wanted)
                checks.append([(shard, p.offset, p.end, p.sha256,
                                f"step {p.step}" if p.step >= 0 else "header/footer")
                               for p in wanted])
            for a, b in ranges:
                rels.append(shard)
                starts.append(a)
                ends.append(b)
        try:
            blobs = self._storage.get_ranges(rels, starts, ends)
        except FileNotFoundError as err:
            gone = [(e, parts) for shard, (e, parts) in needed.items() if not self._storage.exists(shard)]
            where = "; ".join(f"steps {min(p.step for p in parts)}-{max(p.step for p in parts)} of rank {e.rank} "
                              f"({self.kind}) are in {self.run.uri}/{e.shard}" for e, parts in gone)
            raise StoreError(f"a committed shard is missing ({where or err}): the run is incomplete") from None
        chunks: dict[str, list[tuple[int, bytes]]] = {}
        for rel, a, b, data in zip(rels, starts, ends, blobs):
            if len(data) != b - a:
                raise StoreError(f"shard {self.run.uri}/{rel} is truncated (expected bytes "
                                 f"{a}-{b}, got {len(data)})")
            chunks.setdefault(rel, []).append((a, data))
        if self._storage.options.verify_checksums:
            for group in checks:
                for shard, a, b, digest, what in group:
                    data = _slice(chunks[shard], a, b)
                    if sha256_hex(data) != digest:
                        raise StoreError(f"checksum mismatch in shard {self.run.uri}/{shard} "
                                         f"({what}): the object is corrupt or changed after commit")
        out = {}
        for shard, (entry, _) in needed.items():
            try:
                out[shard] = open_sparse(entry.bytes, chunks[shard])
            except pa.ArrowInvalid as err:
                raise StoreError(f"shard {self.run.uri}/{shard} is not a valid Arrow IPC file: "
                                 f"{err}") from None
        return out

    def _merge(self, step: int, readers, layers: list[str], dtype: torch.dtype) -> StepBatch:
        slots = self._index[step]
        batches = []
        for slot in slots:
            rb = readers[slot.entry.shard].get_batch(slot.part.batch)
            if rb.num_rows and rb.column(0)[0].as_py() != step:
                raise StoreError(f"shard {self.run.uri}/{slot.entry.shard}: batch "
                                 f"{slot.part.batch} holds step {rb.column(0)[0]}, expected {step}")
            batches.append(rb)
        pos = np.concatenate([b.column("position").to_numpy() for b in batches])
        key = np.where(pos >= 0, pos, _NO_POSITION + np.arange(len(pos)))
        order = np.argsort(key, kind="stable")
        identity = bool(np.all(order == np.arange(len(order))))
        perm = torch.from_numpy(order)

        grads = {}
        for name in layers:
            raws = []
            for slot, b in zip(slots, batches):
                if name not in b.schema.names:
                    raise StoreError(f"layer '{name}' is absent from shard "
                                     f"{self.run.uri}/{slot.entry.shard}")
                raws.append(column_to_tensor(b.column(name), slot.entry.dtype))
            cols = [r.to(dtype) for r in raws]
            t = torch.cat(cols) if len(cols) > 1 else cols[0]
            if not identity:
                t = t[perm]
            elif len(cols) == 1 and t.dtype == raws[0].dtype:
                t = t.clone()  # never hand out views of (read-only) Arrow memory
            grads[name] = t
        sample_ids = torch.from_numpy(
            np.concatenate([b.column("sample_id").to_numpy() for b in batches])[order].copy())
        sources = [s for b in batches for s in b.column("source").to_pylist()]
        ranks = np.concatenate([b.column("rank").to_numpy().astype(np.int64) for b in batches])
        return StepBatch(step=step, sample_ids=sample_ids, sources=[sources[i] for i in order],
                         positions=torch.from_numpy(pos[order].copy()),
                         ranks=torch.from_numpy(ranks[order].copy()), grads=grads)

    def iter_steps(self, step_start: int = 0, step_end: int | None = None,
                   layers: Sequence[str] | None = None, dtype: torch.dtype = torch.float32
                   ) -> Iterator[StepBatch]:
        """Committed steps in [step_start, step_end) (end None = all), in step order."""
        names = self._check_layers(layers)
        steps = [s for s in self.committed_steps()
                 if s >= step_start and (step_end is None or s < step_end)]
        windows = self._windows(steps)
        if not windows:
            return
        if not self.prefetch:
            for w in windows:
                readers = self._fetch(w)
                for s in w:
                    yield self._merge(s, readers, names, dtype)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayattr-prefetch") as pool:
            nxt = pool.submit(self._fetch, windows[0])
            for i, w in enumerate(windows):
                readers = nxt.result()
                if i + 1 < len(windows):
                    nxt = pool.submit(self._fetch, windows[i + 1])
                for s in w:
                    yield self._merge(s, readers, names, dtype)

    def read_steps(self, step_start: int = 0, step_end: int | None = None,
                   layers: Sequence[str] | None = None, dtype: torch.dtype = torch.float32
                   ) -> list[StepBatch]:
        return list(self.iter_steps(step_start, step_end, layers, dtype))


def _slice(chunks: list[tuple[int, bytes]], a: int, b: int) -> memoryview:
    for off, data in chunks:
        if off <= a and b <= off + len(data):
            return memoryview(data)[a - off:b - off]
    raise StoreError(f"internal: byte range {a}-{b} was not fetched")
