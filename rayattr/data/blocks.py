"""What the data stage's tasks do to one block of rows: pure functions on Arrow tables, no Ray.

data/stage.py runs them in Ray Data tasks; a block is any run of checked corpus rows with the
columns file (index in the listing), position (global row number), id, source and the body.

1. `route_block`: each row's batch-plan slots (data/shards.slots_of), the rows a written step
   uses tokenised once (their file and row named in errors), and one output row per use, keyed by
   `part` = its token file; plus, for the uniqueness check, the block's ids grouped by hash bucket
   (one row per bucket, part = n_files + bucket).
2. `reduce_part`: one part's rows, gathered by Ray Data's hash-partitioned exchange: a token file
   (its bytes and counts), or an id bucket (a DataError naming duplicated ids, else nothing).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayattr.data.errors import DataError
from rayattr.data.shards import ShardLayout, file_bytes, slots_of
from rayattr.data.tokenized import rows_of
from rayattr.data.tokenizer import load_tokenizer

_SHOW = 5
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class StagePlan:
    """What every task of the stage needs: the layout and the listing's URLs and first rows."""

    layout: ShardLayout
    urls: tuple[str, ...]  # data files in listing order
    starts: tuple[int, ...]  # global row number of each file's first row
    tokenizer: str
    pretokenized: bool
    id_buckets: int  # 0: ids are row numbers (unique by construction), nothing to check

    @property
    def n_files(self) -> int:
        return self.layout.n_files

    def where(self, files: np.ndarray, positions: np.ndarray):
        """Names rows of a block by file and row, for the tokeniser's errors."""
        def named(rows: np.ndarray) -> str:
            rows = np.asarray(rows)[:_SHOW]
            f = files[rows]
            url = self.urls[int(f[0])] if len(f) else "?"
            same = rows[f == f[0]]
            return f" (dataset file {url!r}, row(s) {(positions[same] - self.starts[int(f[0])]).tolist()})"
        return named


def part_schema(seq_len: int) -> pa.Schema:
    return pa.schema([("part", pa.int64()), ("slot", pa.int64()), ("id", pa.int64()), ("source", pa.string()),
                      ("length", pa.int32()), ("input_ids", pa.list_(pa.int32(), seq_len)),
                      ("first", pa.int8()), ("truncated", pa.int8()), ("ids", pa.list_(pa.int64()))])


@functools.lru_cache(maxsize=2)
def _tokenizer(spec: str):
    return load_tokenizer(spec)  # once per worker process, not once per block


def id_bucket(ids: np.ndarray, buckets: int) -> np.ndarray:
    """A seedless hash of each id into [0, buckets): the same bucket on every node and run."""
    return ((ids.astype(np.uint64) * _GOLDEN) >> np.uint64(33)) % np.uint64(buckets)


def route_block(block: pa.Table, plan: StagePlan) -> pa.Table:
    """Token rows of the used rows (one per use) and id rows of the block (see module docstring)."""
    lay, schema = plan.layout, part_schema(plan.layout.seq_len)
    positions = block["position"].to_numpy()
    parts = [_token_rows(block, positions, plan, schema)]
    if plan.id_buckets:
        ids = block["id"].to_numpy()
        bucket = id_bucket(ids, plan.id_buckets)
        order = np.argsort(bucket, kind="stable")
        keys, starts = np.unique(bucket[order], return_index=True)
        lists = pa.ListArray.from_arrays(pa.array(np.append(starts, len(ids)), pa.int32()),
                                         pa.array(ids[order], pa.int64()))
        n = len(keys)
        parts.append(pa.table({"part": pa.array(lay.n_files + keys.astype(np.int64)), **_nulls(schema, n, 1, -1),
                               "ids": lists}, schema=schema))
    return pa.concat_tables(parts)


def _nulls(schema: pa.Schema, n: int, a: int, b: int) -> dict:
    return {f.name: pa.nulls(n, f.type) for f in list(schema)[a:len(schema) + b]}


def _token_rows(block: pa.Table, positions: np.ndarray, plan: StagePlan, schema: pa.Schema) -> pa.Table:
    lay = plan.layout
    slots = slots_of(positions, lay)  # (epochs, rows)
    used = np.flatnonzero((slots >= 0).any(axis=0))
    if not len(used):
        return schema.empty_table()
    rows = block.take(pa.array(used))
    where = plan.where(block["file"].to_numpy()[used], positions[used])
    tokens, lengths, cut = rows_of(rows, _tokenizer(plan.tokenizer), lay.seq_len, what="the training data",
                                   where=where)
    epoch, row = np.nonzero(slots[:, used] >= 0)  # one output row per use, by epoch then row
    first = np.zeros(len(row), dtype=np.int8)
    first[np.unique(row, return_index=True)[1]] = 1  # a row's first use carries its counts
    g = lay.plan.global_batch_size
    slot = slots[:, used][epoch, row]
    flat = pa.FixedSizeListArray.from_arrays(pa.array(tokens[row].astype(np.int32).ravel()), lay.seq_len)
    return pa.table({"part": pa.array(slot // (lay.steps_per_file * g)), "slot": pa.array(slot),
                     "id": rows["id"].take(pa.array(row)), "source": rows["source"].take(pa.array(row)).cast(pa.string()),
                     "length": pa.array(lengths[row].astype(np.int32)), "input_ids": flat,
                     "first": pa.array(first), "truncated": pa.array((cut[row] & (first == 1)).astype(np.int8)),
                     "ids": pa.nulls(len(row), pa.list_(pa.int64()))}, schema=schema)


def reduce_part(group: pa.Table, plan: StagePlan) -> pa.Table:
    """One part's rows (all rows with one `part` value): a token file's bytes and counts, or
    nothing for an id bucket whose ids are unique (a DataError naming the duplicates if not)."""
    part = int(group["part"][0].as_py())
    if part >= plan.n_files:
        ids = pc.list_flatten(group["ids"]).to_numpy()
        values, counts = np.unique(ids, return_counts=True)
        dups = values[counts > 1]
        if len(dups):
            raise DataError(f"the training data has duplicated sample id(s), e.g. {dups[:_SHOW].tolist()} "
                            f"({len(dups)} in one of {plan.id_buckets} hash buckets of ids); ids must be unique")
        return file_schema().empty_table()
    first = group["first"].to_numpy().astype(bool)
    sources, counts = np.unique(np.asarray(group["source"].to_pylist(), dtype=object)[first], return_counts=True)
    return pa.table({"part": [part], "rel": [plan.layout.file(part)],
                     "data": pa.array([file_bytes(group, plan.layout, part)], pa.binary()),
                     "encoded": [int(first.sum())], "truncated": [int(group["truncated"].to_numpy().sum())],
                     "sources": pa.array([sources.tolist()], pa.list_(pa.string())),
                     "source_rows": pa.array([counts.tolist()], pa.list_(pa.int64()))}, schema=file_schema())


def file_schema() -> pa.Schema:
    return pa.schema([("part", pa.int64()), ("rel", pa.string()), ("data", pa.binary()), ("encoded", pa.int64()),
                      ("truncated", pa.int64()), ("sources", pa.list_(pa.string())),
                      ("source_rows", pa.list_(pa.int64()))])


def meta_of(layout: ShardLayout, rows_scanned: int, counts: Sequence[dict]) -> dict:
    """The token meta from the file tasks' counts (one small dict per token file)."""
    by_source: dict[str, int] = {}
    for c in counts:
        for s, k in zip(c["sources"], c["source_rows"]):
            by_source[s] = by_source.get(s, 0) + int(k)
    return {"layout": asdict(layout), "rows_scanned": int(rows_scanned),
            "rows_encoded": sum(int(c["encoded"]) for c in counts),
            "n_truncated": sum(int(c["truncated"]) for c in counts),
            "sources": sorted(by_source), "source_rows": dict(sorted(by_source.items()))}
