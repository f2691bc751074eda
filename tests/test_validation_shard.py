"""A segment actor's validation shard reads only its rows (rayattr/model/gradients.py): the row
groups holding each slice, never the whole validation table, and hands text_gradients the very
rows the whole-table read did, so the float64 sums are bit-identical."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rayattr.model import gradients
from rayattr.store.layout import VALIDATION_DATA
from rayattr.model.gradients import VALIDATION_ROWS, row_slices, shard_rows
from tests.test_store import new_run


def validation_table(n: int) -> pa.Table:
    return pa.table({"id": list(range(n)), "source": [f"s{i % 3}" for i in range(n)],
                     "text": [f"text {i} " * (1 + i % 5) for i in range(n)]})


def parquet(table: pa.Table, group_rows: int) -> pq.ParquetFile:
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=group_rows)
    return pq.ParquetFile(pa.BufferReader(sink.getvalue()))


@pytest.mark.parametrize("group_rows", [1, 7, 16, 1000])
def test_row_slices_equal_the_whole_table_slices(group_rows):
    table = validation_table(103)
    pf = parquet(table, group_rows)
    for n_shards in (1, 3, 5, 200):
        for shard in range(n_shards):
            a, b = shard_rows(table.num_rows, shard, n_shards)
            got = list(row_slices(pf, a, b, 16))
            want = [table.slice(s, min(b, s + 16) - s) for s in range(a, b, 16)]
            assert len(got) == len(want)
            assert all(g.combine_chunks().equals(w.combine_chunks()) for g, w in zip(got, want))


def test_row_slices_read_only_the_groups_of_the_shard(monkeypatch):
    """Each slice reads the row groups it overlaps, each group once."""
    pf = parquet(validation_table(100), 10)
    read = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, **kw: read.append(i) or real(self, i, **kw))
    a, b = shard_rows(100, 1, 4)  # rows [25, 50)
    assert sum(t.num_rows for t in row_slices(pf, a, b, 8)) == 25
    assert read == [2, 3, 4]


def test_validation_gradient_sum_hands_the_whole_table_rows(store_root, monkeypatch):
    """validation_gradient_sum (the Ray task's body) on a run's validation set written as
    data/run_data.py writes it: text_gradients gets the same slices as from the whole table,
    and the sums and row counts are those of the whole-table read, bit for bit."""
    from rayattr.data import run_data

    table = validation_table(2 * VALIDATION_ROWS + 77)
    run = new_run(store_root)
    run.write_bytes(VALIDATION_DATA, run_data._parquet_bytes(table, run_data.VALIDATION_GROUP_ROWS))
    assert pq.ParquetFile(run.open_read(VALIDATION_DATA)).metadata.num_row_groups == 3
    run.update_manifest(config={})
    seen = []

    def fake_gradients(run, rows, **kw):  # a deterministic float32 "gradient" per row
        seen.append(rows.combine_chunks())
        ids = torch.tensor(rows["id"].to_pylist(), dtype=torch.float32)
        return {"a": torch.stack([ids.sin(), ids.cos() * 1e-3], 1), "b": (ids / 7).unsqueeze(1)}

    monkeypatch.setattr(gradients, "text_gradients", fake_gradients)
    monkeypatch.setattr(gradients, "final_model", lambda run, cfg: None)
    monkeypatch.setattr(gradients.Config, "from_dict", staticmethod(lambda d: None))
    for n_shards in (1, 2, 3):
        for shard in range(n_shards):
            seen.clear()
            sums, rows = gradients.validation_gradient_sum(run, shard, n_shards)
            a, b = shard_rows(table.num_rows, shard, n_shards)
            assert rows == b - a
            want_slices = [table.slice(s, min(b, s + VALIDATION_ROWS) - s) for s in range(a, b, VALIDATION_ROWS)]
            assert len(seen) == len(want_slices)
            assert all(g.equals(w.combine_chunks()) for g, w in zip(seen, want_slices))
            want: dict[str, torch.Tensor] = {}
            for w in want_slices:  # the former body: slices of the whole table
                for n, g in fake_gradients(run, w).items():
                    want[n] = want[n] + g.double().sum(0) if n in want else g.double().sum(0)
            assert sums.keys() == want.keys() and all(torch.equal(sums[n], want[n]) for n in want)
