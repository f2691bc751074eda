"""What a run holds of its data, and the only way the pipeline writes and reads it.

- data/validation.parquet: the configured validation set, always copied, in row groups of
  VALIDATION_GROUP_ROWS rows (a segment actor's validation shard reads only its row groups).
- Training texts: copied into the run (data/train.parquet for the built-in corpus, data/train/
  part-*.parquet for files from elsewhere, copied a record batch at a time), or, when the files
  already sit in the store's own filesystem or bucket, left where they are: data/train.files.json
  records their URLs, sizes and versions (data/scan.py), and a run checks them again before it
  trains, resumes or shows texts (docs/store.md, "What the pipeline keeps in a run").
- data/tokens/: the token shards of the steps the run trains on (data/shards.py), made by the
  data stage's Ray Data pipeline (data/stage.py); their meta.json is written last and marks the
  data as complete.

Nothing here reads a training row in the driver: the stage's tasks read, check, tokenise and
write, the driver keeps the listing and per-file counts, and text lookups filter by sample id
with pyarrow.dataset.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem

from rayattr.data.corpus import builtin_corpus
from rayattr.data.graded import graded_corpus
from rayattr.data.errors import DataError
from rayattr.data.files import check_unique_ids
from rayattr.data import stage
from rayattr.data.blocks import StagePlan, meta_of
from rayattr.data.scan import (DataFile, body_column, check_columns, check_unchanged, count_rows, default_source,
                               digest, files_of, has_ids, listing, scan, stat_files)
from rayattr.data.shards import RankTokens, ShardLayout
from rayattr.store.layout import TOKENS_META, TRAIN_DATA, TRAIN_LISTING, TRAIN_PARTS, VALIDATION_DATA
from rayattr.data.tokenized import TokenizedDataset
from rayattr.data.tokenizer import load_tokenizer

# Rows per copied part and per row group of a copy: a lookup by id reads one row group.
PART_ROWS = 1 << 18
GROUP_ROWS = 1 << 14
# Rows per row group of the validation set: a segment actor's validation shard reads only the
# row groups of its slices of model/gradients.VALIDATION_ROWS rows (at most two per slice)
VALIDATION_GROUP_ROWS = 256


def in_store(urls: Sequence[str], store_uri: str) -> bool:
    """Whether every data file sits where the run's store is: the local filesystem for a local
    store, the same bucket for s3:// (the ranks and queries reach it with the store's options)."""
    def place(u: str) -> tuple[str, str]:
        if "://" not in u or u.startswith("file://"):
            return ("file", "")
        scheme, rest = u.split("://", 1)
        return (scheme, rest.split("/", 1)[0])
    home = place(store_uri)
    return all(place(u) == home for u in urls)


@dataclass
class PreparedData:
    """Checked data ready to be written into a run; made before the run exists, so bad data
    fails before anything is created. The token files wait in Ray's object store (`tokens`, a
    materialised Ray Data dataset: the driver holds refs, not rows)."""

    validation: pa.Table
    layout: ShardLayout
    tokens: object  # ray.data.MaterializedDataset of token files (data/stage.py)
    rows_scanned: int
    train_copy: pa.Table | None = None  # the built-in corpus
    copy_from: list[DataFile] | None = None  # files from elsewhere, copied into the run by tasks
    listing: dict | None = None  # files left where they are
    pretokenized: bool = False
    with_id: bool = True
    storage_options: dict | None = None
    engine: type = stage.OnRay  # or stage.InProcess (no Ray in this process)

    @property
    def n_train(self) -> int:
        return self.layout.n_samples

    def cleanup(self) -> None:
        self.tokens = None  # the object store frees the files once no ref is held


def layout_of(cfg, n_samples: int) -> ShardLayout:
    from rayattr.data.batching import BatchPlan

    t = cfg.train
    plan = BatchPlan(n_samples, t.micro_batch, t.ranks, t.grad_accum, t.epochs, t.seed)
    return ShardLayout(n_samples=n_samples, micro_batch=t.micro_batch, world_size=t.ranks, grad_accum=t.grad_accum,
                       epochs=t.epochs, seed=t.seed, num_steps=min(plan.num_steps, t.steps or plan.num_steps),
                       seq_len=cfg.data.seq_len, steps_per_file=cfg.store.steps_per_shard)


def check_files(cfg, storage_options: dict | None = None) -> list[DataFile] | None:
    """What the driver checks before Ray starts: the tokenizer, the training files' listing (rows
    from Parquet footers; JSON Lines rows are counted later, by tasks) and every file's columns."""
    d = cfg.data
    load_tokenizer(d.tokenizer)
    if d.train is None:
        return None
    so = storage_options or None
    files = listing(d.train, so, count_jsonl=lambda urls: [-1] * len(urls))
    check_columns(files, so, d.pretokenized)
    if all(f.rows == 0 for f in files):
        raise DataError(f"dataset {d.train} is empty (no rows)")
    return files


def prepare(cfg, storage_options: dict | None = None, on_ray: bool = True,
            files: list[DataFile] | None = None) -> PreparedData:
    """Check the data and tokenise the steps the run trains on, as a Ray Data pipeline over the
    cluster (data/stage.py), before the run exists. The driver reads the listing and the
    validation set, never a training row. on_ray=False: the same steps in this process
    (stage.InProcess, for a process without Ray). files: check_files's listing, if made."""
    d = cfg.data
    so = storage_options or None
    engine = stage.OnRay if on_ray else stage.InProcess
    load_tokenizer(d.tokenizer)  # a bad spec fails here, not in a task
    ref, copy, copy_from, with_id = None, None, None, True
    if d.train is None:
        b = d.builtin
        if b.kind == "graded":
            copy, validation = graded_corpus(n_train=b.n_train, n_validation=b.n_validation,
                                             seed=cfg.train.seed, max_chars=d.builtin_max_chars)
        else:
            copy, validation = builtin_corpus(n_train=b.n_train, n_validation=b.n_validation,
                                              corrupted_fraction=b.corrupted_fraction, seed=cfg.train.seed,
                                              max_chars=d.builtin_max_chars)
        source, n, urls, starts, buckets = engine.table_source(copy), copy.num_rows, ("built-in corpus",), (0,), 0
    else:
        files = files or check_files(cfg, so)
        unknown = [i for i, f in enumerate(files) if f.rows < 0]  # JSON Lines: counted by tasks
        if unknown:
            count = stage.count_jsonl(so) if on_ray else (lambda urls: [count_rows(u, so) for u in urls])
            for i, rows in zip(unknown, count([files[i].url for i in unknown])):
                files[i] = DataFile(**{**asdict(files[i]), "rows": int(rows)})
        n = sum(f.rows for f in files)
        if n == 0:
            raise DataError(f"dataset {d.train} is empty (no rows)")
        validation = pa.Table.from_batches(list(scan(d.validation, so, d.pretokenized)))
        check_unique_ids(validation["id"].to_numpy(), f"validation dataset {d.validation}")
        first = next(f for f in files if f.rows)
        with_id = has_ids(*files_of(first.url, so)[0])
        source = engine.file_source(files, so, d.pretokenized, with_id)
        urls, starts = tuple(f.url for f in files), tuple(int(x) for x in np.cumsum([0] + [f.rows for f in files])[:-1])
        # without ids, ids are row numbers: unique
        buckets = (stage.id_buckets(n) if on_ray else 1) if with_id else 0
        if not d.copy and in_store([f.url for f in files], cfg.store.uri):
            ref = {"spec": d.train, "pretokenized": d.pretokenized, "files": [asdict(f) for f in files],
                   "digest": digest(files), "with_id": with_id}
        else:
            copy_from = files
    TokenizedDataset(validation, load_tokenizer(d.tokenizer), d.seq_len)  # bad validation rows fail here
    try:
        lay = layout_of(cfg, n)
    except DataError:
        engine.check(source)  # what is wrong with the files themselves is said first
        raise
    plan = StagePlan(layout=lay, urls=urls, starts=starts, tokenizer=d.tokenizer, pretokenized=bool(d.pretokenized),
                     id_buckets=buckets)
    tokens = engine.tokenise(source, plan)
    return PreparedData(validation=validation, layout=lay, tokens=tokens, rows_scanned=n, train_copy=copy,
                        copy_from=copy_from, listing=ref, pretokenized=bool(d.pretokenized), with_id=with_id,
                        storage_options=so, engine=engine)


def _parquet_bytes(table: pa.Table, group_rows: int = GROUP_ROWS) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=group_rows)
    return sink.getvalue()


def write(run, prepared: PreparedData) -> dict:
    """Everything prepared into the run (token files and copies by Ray tasks); the token meta
    last (it marks the data complete). Returns the manifest's data fields."""
    so = prepared.storage_options
    try:
        run.write_bytes(VALIDATION_DATA, _parquet_bytes(prepared.validation, VALIDATION_GROUP_ROWS))
        if prepared.train_copy is not None:
            run.write_bytes(TRAIN_DATA, _parquet_bytes(prepared.train_copy))
        parts = 0
        if prepared.copy_from is not None:
            parts = prepared.engine.copy_into(run.uri, prepared.copy_from, so, prepared.pretokenized, prepared.with_id,
                                    PART_ROWS, GROUP_ROWS, TRAIN_PARTS)
        if prepared.listing is not None:
            run.write_json(TRAIN_LISTING, prepared.listing)
        counts = prepared.engine.write_files(prepared.tokens, run.uri, so)
        meta = meta_of(prepared.layout, prepared.rows_scanned, counts)
        meta["nodes"] = sorted({node for c in counts for node in c["nodes"]})
        run.write_json(TOKENS_META, meta)
    finally:
        prepared.cleanup()
    how = "referenced" if prepared.listing is not None else "copied"
    out = {"train": how, "n_used": meta["rows_encoded"], "token_files": prepared.layout.n_files,
           "token_nodes": len(meta["nodes"])}
    if parts:
        out["parts"] = parts
    if prepared.listing is not None:
        out.update(files=len(prepared.listing["files"]), digest=prepared.listing["digest"])
    return {"data": out, "n_train": prepared.n_train, "n_sources": len(meta["sources"])}


def complete(run) -> bool:
    return run.exists(TOKENS_META)


def check_data(run) -> None:
    """DataError if the training files a run left where they are changed since it recorded them."""
    if not run.exists(TRAIN_LISTING):
        return
    ref = run.read_json(TRAIN_LISTING)
    recorded = [DataFile.from_dict(f) for f in ref["files"]]
    current = stat_files([f.url for f in recorded], run.options.storage_options or None)
    check_unchanged(recorded, current, f"training data {ref['spec']}")


def rank_tokens(run, rank: int) -> RankTokens:
    """The token shards as `rank` reads them."""
    if not complete(run):
        raise DataError(f"run {run.uri} has no token shards ({TOKENS_META}): its data stage did not finish")
    return RankTokens(run.read_json(TOKENS_META), run.open_read, rank)


def token_meta(run) -> dict:
    return run.read_json(TOKENS_META)


# ------------------------------------------------------------------ rows by id (queries, report)

def _dataset(files: list[tuple], fs=None) -> ds.Dataset:
    from fsspec.implementations.local import LocalFileSystem

    fs = fs or files[0][0]
    filesystem = None if isinstance(fs, LocalFileSystem) else PyFileSystem(FSSpecHandler(fs))
    fmt = "json" if files[0][1].lower().endswith((".jsonl", ".ndjson")) else "parquet"
    return ds.dataset([p for _, p in files], format=fmt, filesystem=filesystem)


def _run_files(run, rels: list[str]) -> list[tuple]:
    from rayattr.store import open_store_fs

    fs, root = open_store_fs(run.uri, run.options)
    return [(fs, f"{root}/{rel}") for rel in rels]


def train_rows(run, ids: Sequence[int] | np.ndarray, columns: Sequence[str] = ("id", "source", "text")) -> pa.Table:
    """The training rows with these sample ids (each at most once, in no set order), reading only
    what a filter by id needs: row groups whose id statistics exclude them are skipped."""
    want = pa.array(np.unique(np.asarray(ids, dtype=np.int64)), pa.int64())
    if run.exists(TRAIN_LISTING):
        return _referenced_rows(run, run.read_json(TRAIN_LISTING), want, list(columns))
    rels = [TRAIN_DATA] if run.exists(TRAIN_DATA) else [
        f"{TRAIN_PARTS}/{p}" for p in run.list(TRAIN_PARTS) if p.endswith(".parquet") and not p.startswith(".")]
    dataset = _dataset(_run_files(run, rels))
    cols = [c for c in columns if c in dataset.schema.names]
    return dataset.to_table(columns=cols, filter=pc.field("id").isin(want))


def _referenced_rows(run, ref: dict, want: pa.Array, columns: list[str]) -> pa.Table:
    """Rows by id from files left where they are: only the files that can hold the ids are
    checked against the recorded listing and opened (by their id range, or by row order)."""
    so = run.options.storage_options or None
    recorded = [DataFile.from_dict(f) for f in ref["files"]]
    ids = want.to_numpy()
    if ref["with_id"]:
        rows_of_file = {i: None for i, f in enumerate(recorded)
                        if f.id_min is None or ((ids >= f.id_min) & (ids <= f.id_max)).any()}
    else:  # ids are the global row order: file by cumulative row counts, then rows by position
        ends = np.cumsum([f.rows for f in recorded])
        which = np.searchsorted(ends, ids, side="right")
        rows_of_file = {int(i): (ids[which == i], ids[which == i] - (ends[i] - recorded[i].rows))
                        for i in np.unique(which[which < len(recorded)])}
    opened = [recorded[i] for i in rows_of_file]
    check_unchanged(opened, stat_files([f.url for f in opened], so), f"training data {ref['spec']}")
    parts = []
    for i, rows in rows_of_file.items():
        fs, path, url = files_of(recorded[i].url, so)[0]
        d = _dataset([(fs, path)])
        cols = [c for c in columns if c in d.schema.names and (rows is None or c != "id")]
        if rows is None:
            t = d.to_table(columns=cols, filter=pc.field("id").isin(want))
        else:
            t = d.take(pa.array(rows[1]), columns=cols).append_column("id", pa.array(rows[0], pa.int64()))
        parts.append(_with_source(t, url, columns))
    if not parts:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables([p.select([c for c in columns if c in p.column_names]) for p in parts],
                            promote_options="permissive")


def _with_source(t: pa.Table, url: str, columns: list[str]) -> pa.Table:
    if "source" in columns and "source" not in t.column_names:  # pre-tokenised files without sources
        t = t.append_column("source", pa.array([default_source(url)] * t.num_rows, pa.string()))
    return t


def texts_by_id(run, ids: Sequence[int] | np.ndarray, tokenizer=None) -> dict[int, str]:
    """Text of each given training sample id that the run's data has; pre-tokenised rows are
    decoded with the run's tokenizer."""
    pretokenized = bool(run.manifest.get("config", {}).get("data", {}).get("pretokenized"))
    body = body_column(pretokenized)
    rows = train_rows(run, ids, ("id", body))
    if not pretokenized:
        return dict(zip(rows["id"].to_pylist(), rows["text"].to_pylist()))
    if tokenizer is None:
        tokenizer = load_tokenizer(run.manifest["config"]["data"]["tokenizer"])
    return {i: tokenizer.decode(t) for i, t in zip(rows["id"].to_pylist(), rows["input_ids"].to_pylist())}
