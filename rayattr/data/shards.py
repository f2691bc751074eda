"""Token shards of the training data in batch-plan order, written once, read by step and rank.

Why: a rank needs only its own rows of each step (docs/store.md), so the tokens of the steps a
run trains on are laid out in the order it trains on them. File `data/tokens/<first step>.parquet`
covers `steps_per_file` consecutive steps; inside it, row group r holds rank r's rows of those
steps in (step, micro-step, offset) order. A rank reads one row group per file (a range read of
only its rows); rank 0 also reads the id and source columns of the whole file for the step
records. Columns: step, id, source, length (real tokens) and input_ids (fixed-size lists of
seq_len int32 token ids, right-padded).

Writing streams the corpus once (data/scan.py): rows that no trained step uses are never
tokenised, used rows are tokenised once (even when several epochs use them) and spilled to local
buckets by destination file; each bucket is then ordered and written. What a process holds is
one record batch, one bucket and, per corpus row and epoch, the batch plan's slot of the row
(int32), plus each row's int64 id for the uniqueness check.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rayattr.data.batching import BatchPlan, epoch_permutation
from rayattr.data.errors import DataError
from rayattr.data.files import check_unique_ids
from rayattr.data.tokenized import tensors

TOKENS_DIR = "data/tokens"
META = f"{TOKENS_DIR}/meta.json"
# Open spill buckets at most: bounds file handles; a bucket is then several files' rows.
MAX_BUCKETS = 64


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
        return f"{TOKENS_DIR}/{index * self.steps_per_file:08d}.parquet"

    def steps_in(self, index: int) -> int:
        return min(self.steps_per_file, self.num_steps - index * self.steps_per_file)


def _schema(seq_len: int) -> pa.Schema:
    return pa.schema([("slot", pa.int64()), ("id", pa.int64()), ("source", pa.string()),
                      ("length", pa.int32()), ("input_ids", pa.list_(pa.int32(), seq_len))])


@dataclass
class TokenSpill:
    """The used rows, tokenised and bucketed by destination file on local disk (pass one)."""

    layout: ShardLayout
    directory: tempfile.TemporaryDirectory
    files_per_bucket: int
    stats: dict = field(default_factory=dict)  # rows_scanned, rows_encoded, n_truncated, sources

    def write(self, put: Callable[[str, bytes], None]) -> dict:
        """Pass two: each bucket ordered into its files, handed to put(rel, bytes); returns the meta."""
        lay = self.layout
        g = lay.plan.global_batch_size
        for bucket in range(math.ceil(lay.n_files / self.files_per_bucket)):
            first = bucket * self.files_per_bucket
            files = range(first, min(lay.n_files, first + self.files_per_bucket))
            table = _read_bucket(os.path.join(self.directory.name, f"{bucket}.arrow"), lay.seq_len)
            slots = table["slot"].to_numpy()
            order = np.argsort(slots, kind="stable")
            start = first * lay.steps_per_file * g
            expected = np.arange(start, start + sum(lay.steps_in(f) for f in files) * g)
            if not np.array_equal(slots[order], expected):  # every slot exactly once: else a bug, not bad data
                raise DataError(f"token shards {lay.file(first)}...: the corpus scan filled {len(slots)} of "
                                f"{len(expected)} batch-plan slots; was the data changed during the scan?")
            table = table.take(order)
            for f in files:
                a = (f * lay.steps_per_file * g) - start
                put(lay.file(f), _file_bytes(table.slice(a, lay.steps_in(f) * g), lay))
        self.directory.cleanup()
        meta = {"layout": asdict(lay), **self.stats}
        return meta


def _read_bucket(path: str, seq_len: int) -> pa.Table:
    if not os.path.exists(path):
        return _schema(seq_len).empty_table()
    with pa.OSFile(path, "rb") as f:
        return pa.ipc.open_stream(f).read_all()


def _file_bytes(rows: pa.Table, lay: ShardLayout) -> bytes:
    """One shard file: rows in slot order, regrouped rank-major into one row group per rank."""
    g = lay.plan.global_batch_size
    slot = rows["slot"].to_numpy()
    rank = (slot % g) // lay.share
    rows = rows.take(np.lexsort((slot, rank)))
    slot = rows["slot"].to_numpy()
    out = pa.table({"step": pa.array((slot // g).astype(np.int32)), "id": rows["id"], "source": rows["source"],
                    "length": rows["length"], "input_ids": rows["input_ids"]})
    per_rank = len(rows) // lay.world_size
    sink = io.BytesIO()
    with pq.ParquetWriter(sink, out.schema, compression="zstd") as w:
        for r in range(lay.world_size):
            w.write_table(out.slice(r * per_rank, per_rank), row_group_size=max(1, per_rank))
    return sink.getvalue()


def plan_slots(lay: ShardLayout) -> np.ndarray:
    """(epochs, n_samples): the global slot (step * G + position in the global batch) each row
    fills in each epoch, -1 where no written step uses it; int32 while slots fit (half the memory)."""
    plan, g = lay.plan, lay.plan.global_batch_size
    spe = plan.steps_per_epoch
    dtype = np.int32 if lay.num_steps * g < np.iinfo(np.int32).max else np.int64
    slots = np.full((lay.epochs, lay.n_samples), -1, dtype=dtype)
    for e in range(lay.epochs):
        used = max(0, min(spe, lay.num_steps - e * spe)) * g
        # uncached: the driver need not keep n-long permutations after the data stage
        perm = epoch_permutation.__wrapped__(lay.n_samples, e, lay.seed)
        slots[e, perm[:used]] = e * spe * g + np.arange(used)
        del perm
    return slots


Encoder = Callable[[pa.RecordBatch], tuple[np.ndarray, np.ndarray, int]]


def spill_tokens(batches: Iterable[pa.RecordBatch], lay: ShardLayout, encode: Encoder) -> TokenSpill:
    """Pass one: stream the corpus, tokenise the rows the written steps use, bucket them on disk.

    `batches` carry id and source plus the body `encode` turns into (token rows, lengths,
    truncated count); rows come in corpus order (the batch plan's sample positions)."""
    slots = plan_slots(lay)
    g = lay.plan.global_batch_size
    files_per_bucket = math.ceil(lay.n_files / MAX_BUCKETS)
    directory = tempfile.TemporaryDirectory(prefix="rayattr-tokens-")
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    schema = _schema(lay.seq_len)
    position = encoded = truncated = 0
    ids: list[np.ndarray] = []
    sources: set[str] = set()
    try:
        for batch in batches:
            n = batch.num_rows
            if position + n > lay.n_samples:
                raise DataError(f"the training data has more rows than the {lay.n_samples} it had when "
                                "counted; was it changed during the scan?")
            ids.append(batch["id"].to_numpy())
            mine = slots[:, position:position + n]
            position += n
            used = np.flatnonzero((mine >= 0).any(axis=0))
            if not len(used):
                continue  # unused rows are never tokenised
            rows = batch.take(pa.array(used))
            tokens, lengths, cut = encode(rows)
            encoded, truncated = encoded + len(used), truncated + cut
            sources.update(rows["source"].unique().to_pylist())
            flat = pa.FixedSizeListArray.from_arrays(pa.array(tokens.astype(np.int32).ravel()), lay.seq_len)
            for e in range(lay.epochs):
                keep = np.flatnonzero(mine[e, used] >= 0)
                if not len(keep):
                    continue
                slot = mine[e, used[keep]].astype(np.int64)
                part = pa.record_batch([pa.array(slot), rows["id"].take(keep), rows["source"].take(keep),
                                        pa.array(lengths[keep].astype(np.int32)), flat.take(keep)], schema=schema)
                bucket = slot // g // lay.steps_per_file // files_per_bucket
                for b in np.unique(bucket):
                    if b not in writers:
                        writers[b] = pa.ipc.new_stream(os.path.join(directory.name, f"{b}.arrow"), schema)
                    writers[b].write_batch(part.filter(pa.array(bucket == b)))
        for w in writers.values():
            w.close()
        if position != lay.n_samples:
            raise DataError(f"the training data has {position} rows, not the {lay.n_samples} it had when counted; "
                            "was it changed during the scan?")
        check_unique_ids(np.concatenate(ids), "training data")
    except BaseException:
        for w in writers.values():
            w.close()
        directory.cleanup()
        raise
    stats = {"rows_scanned": position, "rows_encoded": encoded, "n_truncated": truncated,
             "sources": sorted(sources)}
    return TokenSpill(lay, directory, files_per_bucket, stats)


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
