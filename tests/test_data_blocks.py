"""The data stage's per-block work without Ray (rayattr/data/permutation.py, blocks.py): the
batch plan's permutation, token files that do not depend on how rows were cut into blocks, and
bad rows and duplicated ids named. tests/test_data_stream.py runs the same on Ray Data."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayattr.data import BatchPlan, DataError, builtin_corpus
from rayattr.data.blocks import StagePlan, reduce_part, route_block
from rayattr.data.permutation import to_position, to_slot
from rayattr.data.scan import file_batches, files_of
from rayattr.data.shards import ShardLayout


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 1536, 100_003])
def test_permutation_is_a_bijection_with_its_inverse(n):
    slots = to_slot(np.arange(n), n, seed=3, epoch=1)
    assert np.array_equal(np.sort(slots), np.arange(n))
    assert np.array_equal(to_position(slots, n, 3, 1), np.arange(n))
    part = np.arange(n)[n // 3:]  # any subset gives the same slots as the whole
    assert np.array_equal(to_slot(part, n, 3, 1), slots[n // 3:])


def test_permutation_depends_on_seed_and_epoch_only():
    n = 5000
    a = to_position(np.arange(n), n, 0, 0)
    assert np.array_equal(a, to_position(np.arange(n), n, 0, 0))
    for other in (to_position(np.arange(n), n, 1, 0), to_position(np.arange(n), n, 0, 1)):
        assert (a != other).mean() > 0.99
    # shuffled, not shifted: consecutive slots land far apart, neighbours rarely stay neighbours
    assert np.mean(np.abs(np.diff(a)) == 1) < 0.01
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.05


def layout(n: int, **over) -> ShardLayout:
    kw = dict(n_samples=n, micro_batch=8, world_size=2, grad_accum=2, epochs=2, seed=0, num_steps=60,
              seq_len=64, steps_per_file=16)
    kw.update(over)
    return ShardLayout(**kw)


def blocks_of(table: pa.Table, rows: int) -> list[pa.Table]:
    n = table.num_rows
    t = table.add_column(0, "file", pa.array(np.zeros(n, np.int32))).add_column(
        1, "position", pa.array(np.arange(n), pa.int64()))
    return [t.slice(a, rows) for a in range(0, n, rows)]


def files_from(blocks: list[pa.Table], plan: StagePlan) -> dict[int, bytes]:
    """What the stage's exchange does: every routed row grouped by part, each part reduced."""
    routed = pa.concat_tables([route_block(b, plan) for b in blocks])
    parts = routed["part"].to_numpy()
    out = {}
    for p in np.unique(parts):
        done = reduce_part(routed.take(np.flatnonzero(parts == p)), plan)
        for row in done.to_pylist():
            out[row["part"]] = row["data"]
    return out


def test_token_files_do_not_depend_on_the_blocks_and_follow_the_plan():
    train, _ = builtin_corpus()
    lay = layout(train.num_rows)
    plan = StagePlan(lay, ("corpus",), (0,), "byte", False, id_buckets=2)
    whole = files_from(blocks_of(train, train.num_rows), plan)
    assert sorted(whole) == list(range(lay.n_files))
    for rows in (1000, 97):
        assert files_from(blocks_of(train, rows)[::-1], plan) == whole  # other cuts, other order
    bp = BatchPlan(train.num_rows, 8, 2, 2, 2, 0)
    ids = train["id"].to_numpy()
    for index, data in whole.items():
        t = pq.read_table(pa.BufferReader(data))
        assert pq.ParquetFile(pa.BufferReader(data)).num_row_groups == 2  # rank-major: one row group per rank
        steps = range(index * 16, min(60, index * 16 + 16))
        want = np.concatenate([np.concatenate([ids[bp.rank_indices(s, r)] for s in steps]) for r in range(2)])
        assert t["id"].to_numpy().tolist() == want.tolist()


def test_duplicated_ids_are_named():
    ids = np.arange(300)
    ids[[40, 250]] = [7, 123]  # 7 and 123 twice each
    table = pa.table({"id": ids, "source": ["s"] * 300, "text": [f"text {i}" for i in range(300)]})
    plan = StagePlan(layout(300, num_steps=2, epochs=1), ("c",), (0,), "byte", False, id_buckets=3)
    with pytest.raises(DataError, match=r"duplicated sample id\(s\), e.g. \[(7|123)"):
        files_from(blocks_of(table, 64), plan)
    plan = StagePlan(plan.layout, ("c",), (0,), "byte", False, id_buckets=1)
    with pytest.raises(DataError, match=r"e.g. \[7, 123\]"):
        files_from(blocks_of(table, 64), plan)


def test_bad_rows_are_named_by_file_and_row(tmp_path):
    texts = [f"text {i}" for i in range(50)]
    texts[17] = None
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"source": ["s"] * 50, "text": texts}), path, row_group_size=10)
    fs, p, url = files_of(str(path), None)[0]
    with pytest.raises(DataError, match=r"column 'text' in dataset file .*a.parquet' has 1 null value\(s\), "
                                        r"e.g. row\(s\) \[17\]"):
        list(file_batches(fs, p, url, False, None, 0, batch_rows=10))
    # a pre-tokenised id outside the vocabulary: the file and its row in the file
    tokens = pa.table({"id": np.arange(100), "source": ["s"] * 100,
                       "input_ids": pa.array([[1, 2]] * 99 + [[1, 999]], pa.list_(pa.int32()))})
    plan = StagePlan(layout(200, num_steps=12, epochs=1), ("first.parquet", "second.parquet"), (0, 100), "byte",
                     True, id_buckets=0)
    block = tokens.add_column(0, "file", pa.array(np.ones(100, np.int32))).add_column(
        1, "position", pa.array(np.arange(100, 200), pa.int64()))
    with pytest.raises(DataError, match=r"outside the tokenizer's vocabulary .* sample id\(s\) \[99\] "
                                        r"\(dataset file 'second.parquet', row\(s\) \[99\]\)"):
        route_block(block, plan)


def test_the_stage_in_a_process_without_ray_names_bad_rows_before_the_run_exists(tmp_path):
    """rayattr.new_run in a user's script without Ray: the same checks, in this process."""
    from rayattr.config import Config
    from rayattr.data import run_data

    train, val = builtin_corpus()
    texts = train["text"].to_pylist()
    texts[700] = None
    pq.write_table(train.slice(0, 600), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": train["id"].slice(600), "source": train["source"].slice(600),
                             "text": pa.array(texts[600:], pa.string())}), tmp_path / "b.parquet")
    pq.write_table(val, tmp_path / "val.parquet")
    cfg = Config().with_overrides(**{"store.uri": str(tmp_path / "store"), "run_id": "r",
                                     "data.train": [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")],
                                     "data.validation": str(tmp_path / "val.parquet")}).validate()
    with pytest.raises(DataError, match=r"'text' in dataset file .*b.parquet' has 1 null value\(s\), e.g. row\(s\) \[100\]"):
        run_data.prepare(cfg, on_ray=False)
    assert not (tmp_path / "store").exists()
