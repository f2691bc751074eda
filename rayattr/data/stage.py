"""The data stage on the cluster: Ray Data from the training files to the run's token shards.

    read (CorpusSource: one task per run of consecutive files, each row with its global position)
      -> map_batches(route_block): check, compute the batch plan's slots, tokenise the used rows
      -> groupby("part").map_groups(reduce_part): one task per token file (ordered, rank-major
         bytes) and per hash bucket of ids (duplicates named)
      -> materialize: the files' bytes wait in the object store until the run exists
    then write_files: each file put into the run by a task; the driver gets one small row per file.

The driver holds the listing (a few numbers per file), object refs and per-file counts: nothing
per row. Bad data raises a DataError from a task, re-raised here as itself.

`InProcess` runs the same block functions in the calling process, for a process without Ray
(rayattr.new_run in a user's own training script): the same bytes, but that process then holds
every id and every used row's tokens, so a corpus that needs the cluster needs Ray started.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayattr.data.limits import BATCH_ROWS, BUCKET_IDS, TASK_ROWS
from rayattr.data.blocks import StagePlan, reduce_part, route_block
from rayattr.data.errors import DataError
from rayattr.data.scan import DataFile, body_column, count_rows, file_batches, files_of

log = logging.getLogger(__name__)
_DATA_ERROR = re.compile(r"rayattr\.data\.errors\.DataError: ([^\n]*)")



def _ray():
    import ray
    import ray.data

    if not ray.is_initialized():
        raise DataError("the data stage runs on Ray Data: connect to Ray first (rayattr.runtime.cluster.connect)")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray


@contextlib.contextmanager
def named_errors() -> Iterator[None]:
    """A DataError raised in a task comes out as itself, not wrapped in Ray's task errors (and
    Ray Data does not log its traceback: the error is the user's data, named in one line)."""
    quiet = [logging.getLogger(n) for n in ("ray.data", "ray")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)
    try:
        yield
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - searched for the DataError it carries
        seen, e = set(), err
        while e is not None and id(e) not in seen:
            seen.add(id(e))
            if isinstance(e, DataError):
                raise DataError(str(e)) from None
            # a UDF's exception may come back only as its remote traceback's text
            found = _DATA_ERROR.search(str(e))
            if found:
                raise DataError(found.group(1)) from None
            e = getattr(e, "cause", None) or e.__cause__ or e.__context__
        raise
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def _cpus() -> int:
    return max(1, int(_ray().cluster_resources().get("CPU", 1)))


def count_jsonl(storage_options: dict | None):
    """A listing's JSON Lines counter: each file parsed by a Ray task, not by the driver."""
    def count(urls: list[str]) -> list[int]:
        ray = _ray()
        task = ray.remote(count_rows)
        with named_errors():
            return ray.get([task.remote(u, storage_options) for u in urls])
    return count


def id_buckets(n_rows: int) -> int:
    return max(1, min(_cpus(), -(-n_rows // BUCKET_IDS)))


# ------------------------------------------------------------------ reading

def _read_files(files: Sequence[tuple[int, str, int, int]], storage_options: dict | None, pretokenized: bool,
                with_id: bool, batch_rows: int, columns: Sequence[str] | None) -> Iterator[pa.Table]:
    """Checked blocks of some listed files, with columns file and position added."""
    for index, url, start, rows in files:
        fs, path, _ = files_of(url, storage_options)[0]
        seen = 0
        for batch in file_batches(fs, path, url, pretokenized, with_id, start, columns, batch_rows, storage_options):
            n = batch.num_rows
            table = pa.Table.from_batches([batch])
            yield table.add_column(0, "file", pa.array(np.full(n, index, np.int32))).add_column(
                1, "position", pa.array(np.arange(start + seen, start + seen + n), pa.int64()))
            seen += n
        if seen != rows:
            raise DataError(f"dataset file {url!r} has {seen} rows, not the {rows} it had when listed; "
                            "was it changed during the data stage?")


def file_source(files: Sequence[DataFile], storage_options: dict | None, pretokenized: bool, with_id: bool,
                batch_rows: int | None = None, columns: Sequence[str] | None = None):
    """A Ray Data dataset of the listed files' checked rows: one read task per run of consecutive
    files holding at least TASK_ROWS rows (fewer where that leaves CPUs idle), or one file."""
    ray = _ray()
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    batch_rows = batch_rows or BATCH_ROWS
    task_rows = min(TASK_ROWS, -(-sum(f.rows for f in files) // (2 * _cpus())))
    groups: list[list[tuple[int, str, int, int]]] = [[]]
    start = 0
    for i, f in enumerate(files):
        if f.rows:
            if sum(r for *_, r in groups[-1]) >= task_rows:
                groups.append([])
            groups[-1].append((i, f.url, start, f.rows))
        start += f.rows

    class CorpusSource(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [ReadTask(lambda g=g: _read_files(g, storage_options, pretokenized, with_id, batch_rows, columns),
                             BlockMetadata(num_rows=sum(r for *_, r in g), size_bytes=None, exec_stats=None,
                                           input_files=tuple(u for _, u, _, _ in g)))
                    for g in groups if g]

    # one block per record batch: no splitting into many tiny blocks to reach a parallelism
    return ray.data.read_datasource(CorpusSource(), override_num_blocks=sum(1 for g in groups if g))


def table_source(table: pa.Table):
    """The same dataset from a table the driver made (the built-in corpus): one listed "file", in
    blocks enough for two per CPU."""
    ray = _ray()
    n = table.num_rows
    batch_rows = max(1, min(BATCH_ROWS, -(-n // (2 * _cpus()))))
    table = table.add_column(0, "file", pa.array(np.zeros(n, np.int32))).add_column(
        1, "position", pa.array(np.arange(n), pa.int64()))
    return ray.data.from_arrow([table.slice(a, batch_rows) for a in range(0, n, batch_rows)])


def check(source) -> None:
    """Read every row (the read tasks check them) without tokenising: what is wrong with the
    files is said before what is wrong with the settings."""
    with named_errors():
        source.map_batches(lambda b: b.slice(0, 0), batch_format="pyarrow", batch_size=None).materialize()


# ------------------------------------------------------------------ tokenising and writing

def _routed(block: pa.Table, plan: StagePlan) -> pa.Table:
    import ray

    out = route_block(block, plan)
    node = ray.get_runtime_context().get_node_id()
    return out.append_column("node", pa.array([node] * out.num_rows, pa.string()))


def _reduced(group: pa.Table, plan: StagePlan) -> pa.Table:
    out = reduce_part(group.drop_columns(["node"]), plan)
    nodes = sorted(set(group["node"].to_pylist())) if out.num_rows else []
    return out.append_column("nodes", pa.array([nodes] * out.num_rows, pa.list_(pa.string())))


def tokenise(source, plan: StagePlan):
    """The token files of the plan, materialised in the object store (the driver holds refs)."""
    _ray()
    parts = plan.n_files + plan.id_buckets
    ds = source.map_batches(_routed, fn_kwargs={"plan": plan}, batch_format="pyarrow", batch_size=None)
    ds = ds.groupby("part", num_partitions=max(1, min(parts, _cpus()))).map_groups(
        _reduced, fn_kwargs={"plan": plan}, batch_format="pyarrow")
    with named_errors():
        return ds.materialize()


class InProcess:
    """The stage's sources and steps run in this process (see module docstring)."""

    @staticmethod
    def file_source(files: Sequence[DataFile], storage_options: dict | None, pretokenized: bool, with_id: bool,
                    batch_rows: int | None = None):
        start, blocks = 0, []
        for i, f in enumerate(files):
            if f.rows:
                blocks.append(lambda g=[(i, f.url, start, f.rows)]: _read_files(g, storage_options, pretokenized,
                                                                                 with_id, batch_rows or BATCH_ROWS,
                                                                                 None))
            start += f.rows
        return lambda: (b for read in blocks for b in read())

    @staticmethod
    def table_source(table: pa.Table):
        n = table.num_rows
        t = table.add_column(0, "file", pa.array(np.zeros(n, np.int32))).add_column(
            1, "position", pa.array(np.arange(n), pa.int64()))
        return lambda: iter(t.to_batches(max_chunksize=BATCH_ROWS))

    @staticmethod
    def check(source) -> None:
        for _ in source():
            pass

    @staticmethod
    def tokenise(source, plan: StagePlan) -> list[pa.Table]:
        routed = pa.concat_tables([route_block(pa.table(b) if isinstance(b, pa.RecordBatch) else b, plan)
                                   for b in source()])
        parts = routed["part"].to_numpy()
        order = np.argsort(parts, kind="stable")
        keys, starts = np.unique(parts[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        out = [reduce_part(routed.take(order[a:b]), plan) for a, b in zip(starts, ends)]
        return [t.append_column("nodes", pa.array([["driver"]] * t.num_rows, pa.list_(pa.string())))
                for t in out if t.num_rows]

    @staticmethod
    def write_files(tokens: list[pa.Table], run_uri: str, storage_options: dict | None) -> list[dict]:
        return [row for t in tokens for row in _put(t, run_uri, storage_options).to_pylist()]

    @staticmethod
    def copy_into(run_uri: str, files: Sequence[DataFile], storage_options: dict | None, pretokenized: bool,
                  with_id: bool, part_rows: int, group_rows: int, prefix: str) -> int:
        parts = 0
        for block in InProcess.file_source(files, storage_options, pretokenized, with_id, part_rows)():
            _copy_part(block, run_uri, storage_options, group_rows, prefix)
            parts += 1
        return parts


class OnRay:
    """The stage on Ray Data (the functions above)."""

    file_source = staticmethod(lambda *a, **kw: file_source(*a, **kw))
    table_source = staticmethod(lambda *a, **kw: table_source(*a, **kw))
    check = staticmethod(lambda *a, **kw: check(*a, **kw))
    tokenise = staticmethod(lambda *a, **kw: tokenise(*a, **kw))
    write_files = staticmethod(lambda *a, **kw: write_files(*a, **kw))
    copy_into = staticmethod(lambda *a, **kw: copy_into(*a, **kw))


def _put(batch: pa.Table, run_uri: str, storage_options: dict | None) -> pa.Table:
    from rayattr.store import Run, StoreOptions

    run = Run.open_uri(run_uri, options=StoreOptions(storage_options=storage_options or {}), mode="record")
    for rel, data in zip(batch["rel"].to_pylist(), batch["data"].to_pylist()):
        run.write_bytes(rel, data)
    return batch.drop_columns(["data"])


def write_files(tokens, run_uri: str, storage_options: dict | None) -> list[dict]:
    """Each token file put into the run by a task; returns every file's counts (one row each)."""
    _ray()
    with named_errors():
        return tokens.map_batches(_put, fn_kwargs={"run_uri": run_uri, "storage_options": storage_options},
                                  batch_format="pyarrow", batch_size=None).take_all()


def _copy_part(block: pa.Table, run_uri: str, storage_options: dict | None, group_rows: int,
               prefix: str) -> pa.Table:
    from rayattr.store import Run, StoreOptions

    run = Run.open_uri(run_uri, options=StoreOptions(storage_options=storage_options or {}), mode="record")
    rel = f"{prefix}/part-{int(block['position'][0].as_py()):012d}.parquet"  # named by its first row
    sink = pa.BufferOutputStream()
    pq.write_table(block.drop_columns(["file", "position"]), sink, compression="zstd", row_group_size=group_rows)
    run.write_bytes(rel, sink.getvalue().to_pybytes())
    return pa.table({"rel": [rel], "rows": [block.num_rows]})


def copy_into(run_uri: str, files: Sequence[DataFile], storage_options: dict | None, pretokenized: bool,
              with_id: bool, part_rows: int, group_rows: int, prefix: str) -> int:
    """The training files copied into the run as Parquet parts (ids included) by Ray tasks, each
    part a block of at most part_rows rows; returns how many parts."""
    source = file_source(files, storage_options, pretokenized, with_id, batch_rows=part_rows,
                         columns=("id", "source", body_column(pretokenized)))
    with named_errors():
        return len(source.map_batches(_copy_part, fn_kwargs={"run_uri": run_uri, "storage_options": storage_options,
                                                               "group_rows": group_rows, "prefix": prefix},
                                      batch_format="pyarrow", batch_size=None).take_all())
