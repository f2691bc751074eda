"""Token shards of the training data in batch-plan order, written once, read by step and rank.

Why: a rank needs only its own rows of each step (docs/store.md), so the tokens of the steps a
run trains on are laid out in the order it trains on them. File `data/tokens/<first step>.parquet`
covers `steps_per_file` consecutive steps; inside it, row group r holds rank r's rows of those
steps in (step, micro-step, offset) order. A rank reads one row group per file (a range read of
only its rows); rank 0 also reads the id and source columns of the whole file for the step
records. Columns: step, id, source, length (real tokens) and input_ids (fixed-size lists of
seq_len int32 token ids, right-padded).

Writing is the data stage's Ray Data pipeline (data/stage.py): each read task computes its own
rows' slots (`slots_of`), tokenises only the rows a written step uses, and the rows of one file
meet in one task that orders them (`file_bytes`). No process holds anything per corpus row.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rayattr.data.batching import BatchPlan
from rayattr.data.errors import DataError
from rayattr.data.permutation import to_slot
from rayattr.data.tokenized import tensors
from rayattr.store.layout import tokens_path



@dataclass(frozen=True)
class ShardLayout:
    """Which steps the shards hold and how they are cut (the batch plan's numbers)."""

    n_samples: int
    micro_batch: int
    world_size: int
    grad_accum: int
    epochs: int
    seed: int
    num_steps: int  # steps written: the run's steps (train.steps caps them)
    seq_len: int
    steps_per_file: int

    @property
    def plan(self) -> BatchPlan:
        return BatchPlan(self.n_samples, self.micro_batch, self.world_size, self.grad_accum, self.epochs, self.seed)

    @property
    def share(self) -> int:
        """Rows of one rank in one step."""
        return self.micro_batch * self.grad_accum

    @property
    def n_files(self) -> int:
        return math.ceil(self.num_steps / self.steps_per_file)

    def file(self, index: int) -> str:
        return tokens_path(index * self.steps_per_file)

    def steps_in(self, index: int) -> int:
        return min(self.steps_per_file, self.num_steps - index * self.steps_per_file)


def slots_of(positions: np.ndarray, lay: ShardLayout) -> np.ndarray:
    """(epochs, len(positions)): the global slot (step * G + place in the global batch) each corpus
    position fills in each epoch, -1 where no written step uses it. Evaluated for these positions
    alone (data/permutation.py): a read task needs nothing but its own rows and the layout."""
    plan, g = lay.plan, lay.plan.global_batch_size
    spe = plan.steps_per_epoch
    out = np.full((lay.epochs, len(positions)), -1, dtype=np.int64)
    for e in range(lay.epochs):
        used = max(0, min(spe, lay.num_steps - e * spe)) * g
        slot = to_slot(positions, lay.n_samples, lay.seed, e)
        keep = slot < used
        out[e, keep] = e * spe * g + slot[keep]
    return out


def file_bytes(rows: pa.Table, lay: ShardLayout, index: int) -> bytes:
    """Token file `index` from its rows (columns slot, id, source, length, input_ids, in any order):
    every slot of its steps exactly once, regrouped rank-major into one row group per rank."""
    g = lay.plan.global_batch_size
    start = index * lay.steps_per_file * g
    rows = rows.take(np.argsort(rows["slot"].to_numpy(), kind="stable"))
    slot = rows["slot"].to_numpy()
    if not np.array_equal(slot, np.arange(start, start + lay.steps_in(index) * g)):  # a bug, not bad data
        raise DataError(f"token shard {lay.file(index)}: the corpus scan filled {len(slot)} of "
                        f"{lay.steps_in(index) * g} batch-plan slots; was the data changed during the scan?")
    rank = (slot % g) // lay.share
    rows = rows.take(np.lexsort((slot, rank)))
    slot = rows["slot"].to_numpy()
    # one chunk per column: the bytes then do not depend on how the rows arrived
    out = pa.table({"step": pa.array((slot // g).astype(np.int32)), "id": rows["id"], "source": rows["source"],
                    "length": rows["length"], "input_ids": rows["input_ids"]}).combine_chunks()
    per_rank = len(rows) // lay.world_size
    sink = io.BytesIO()
    with pq.ParquetWriter(sink, out.schema, compression="zstd") as w:
        for r in range(lay.world_size):
            w.write_table(out.slice(r * per_rank, per_rank), row_group_size=max(1, per_rank))
    return sink.getvalue()


class RankTokens:
    """One rank's token rows, read from the shards a file (one row group) at a time.

    bytes_read / rows_read count what this reader fetched from the store: what a test checks
    to see that unused rows cost nothing."""

    def __init__(self, meta: dict, open_file: Callable[[str], io.IOBase], rank: int):
        self.lay = ShardLayout(**meta["layout"])
        if not 0 <= rank < self.lay.world_size:
            raise DataError(f"rank {rank} is outside the token shards' world_size {self.lay.world_size}")
        self.meta, self.rank, self._open = meta, rank, open_file
        self.bytes_read = self.rows_read = 0
        self._mine: tuple[int, pa.Table] | None = None  # (file index, this rank's rows)
        self._whole: tuple[int, pa.Table] | None = None  # (file index, id and source of every rank)

    @property
    def n_train(self) -> int:
        return self.lay.n_samples

    @property
    def num_truncated(self) -> int:
        return int(self.meta["n_truncated"])

    def _check(self, step: int) -> int:
        if not 0 <= step < self.lay.num_steps:
            raise DataError(f"step {step} is outside the {self.lay.num_steps} steps the token shards hold")
        return step // self.lay.steps_per_file

    def _read(self, index: int, row_groups: list[int], columns: list[str]) -> pa.Table:
        with self._open(self.lay.file(index)) as raw:
            counted = _Counting(raw)
            table = pq.ParquetFile(counted).read_row_groups(row_groups, columns=columns)
        self.bytes_read += counted.count
        self.rows_read += table.num_rows
        return table

    def _rows(self, step: int) -> pa.Table:
        index = self._check(step)
        if self._mine is None or self._mine[0] != index:
            self._mine = (index, self._read(index, [self.rank], ["step", "id", "source", "length", "input_ids"]))
        share = self.lay.share
        return self._mine[1].slice((step - index * self.lay.steps_per_file) * share, share)

    def share(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """ids and sources of this rank's rows of `step` (micro-steps in order)."""
        rows = self._rows(step)
        return rows["id"].to_numpy(), np.asarray(rows["source"].to_pylist(), dtype=object)

    def micro_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, labels and ids of micro-step `micro` of `step`, as
        TokenizedDataset.batch gives them for BatchPlan.rank_slice(step, rank, micro)."""
        if not 0 <= micro < self.lay.grad_accum:
            raise DataError(f"micro_step {micro} is outside grad_accum {self.lay.grad_accum}")
        rows = self._rows(step).slice(micro * self.lay.micro_batch, self.lay.micro_batch)
        tokens = rows["input_ids"].combine_chunks().flatten().to_numpy().reshape(-1, self.lay.seq_len)
        out = tensors(tokens, rows["length"].to_numpy())
        out["ids"] = torch.from_numpy(rows["id"].to_numpy().astype(np.int64))
        return out

    def step_ids(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """ids and sources of the whole global batch of `step` in global-batch order (rank-major),
        read from the id and source columns only (rank 0's step records)."""
        index = self._check(step)
        if self._whole is None or self._whole[0] != index:
            self._whole = (index, self._read(index, list(range(self.lay.world_size)), ["step", "id", "source"]))
        t = self._whole[1]
        keep = np.flatnonzero(t["step"].to_numpy() == step)  # rank-major already: rank r's rows follow r-1's
        rows = t.take(keep)
        return rows["id"].to_numpy(), np.asarray(rows["source"].to_pylist(), dtype=object)


class _Counting(io.RawIOBase):
    """A read-only file that counts the bytes read through it."""

    def __init__(self, inner):
        self.inner, self.count = inner, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.inner.seek(offset, whence)

    def tell(self) -> int:
        return self.inner.tell()

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.count += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)
