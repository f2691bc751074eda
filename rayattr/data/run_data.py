"""What a run holds of its data, and the only way the pipeline writes and reads it.

- data/validation.parquet: the configured validation set, always copied, in row groups of
  VALIDATION_GROUP_ROWS rows (a validation task reads only the row groups of its shard).
- Training texts: copied into the run (data/train.parquet for the built-in corpus, data/train/
  part-*.parquet for files from elsewhere, copied a record batch at a time), or, when the files
  already sit in the store's own filesystem or bucket, left where they are: data/train.files.json
  records their URLs, sizes and versions (data/scan.py), and a run checks them again before it
  trains, resumes or shows texts (docs/store.md, "What the pipeline keeps in a run").
- data/tokens/: the token shards of the steps the run trains on (data/shards.py); their
  meta.json is written last and marks the data as complete.

Nothing here reads a whole training corpus into one process: the scan streams, the token pass
keeps used rows only, and text lookups filter by sample id with pyarrow.dataset.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem

from rayattr.data.corpus import builtin_corpus
from rayattr.data.errors import DataError
from rayattr.data.files import check_unique_ids
from rayattr.data.scan import (BATCH_ROWS, DataFile, body_column, check_unchanged, default_source, digest,
                               files_of, listing, scan, stat_files)
from rayattr.data.shards import META, RankTokens, ShardLayout, TokenSpill, spill_tokens
from rayattr.data.tokenized import TokenizedDataset, rows_of
from rayattr.data.tokenizer import load_tokenizer

VALIDATION = "data/validation.parquet"
TRAIN_COPY = "data/train.parquet"
TRAIN_PARTS = "data/train"
LISTING = "data/train.files.json"
# Rows per copied part and per row group of a copy: a lookup by id reads one row group.
PART_ROWS = 1 << 18
GROUP_ROWS = 1 << 14
# Rows per row group of the validation set: a validation task reads only the row groups of its
# slices of reduce/gradients.VALIDATION_ROWS rows (at most two per slice)
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
    fails before anything is created."""

    validation: pa.Table
    tokens: TokenSpill
    train_copy: pa.Table | None = None  # the built-in corpus
    parts: list[str] = field(default_factory=list)  # local copies of files from elsewhere
    listing: dict | None = None  # files left where they are
    scratch: tempfile.TemporaryDirectory | None = None

    @property
    def n_train(self) -> int:
        return self.tokens.layout.n_samples

    def cleanup(self) -> None:
        if self.scratch is not None:
            self.scratch.cleanup()
        self.tokens.directory.cleanup()


def layout_of(cfg, n_samples: int) -> ShardLayout:
    from rayattr.data.batching import BatchPlan

    t = cfg.train
    plan = BatchPlan(n_samples, t.micro_batch, t.ranks, t.grad_accum, t.epochs, t.seed)
    return ShardLayout(n_samples=n_samples, micro_batch=t.micro_batch, world_size=t.ranks, grad_accum=t.grad_accum,
                       epochs=t.epochs, seed=t.seed, num_steps=min(plan.num_steps, t.steps or plan.num_steps),
                       seq_len=cfg.data.seq_len, steps_per_file=cfg.store.steps_per_shard)


def _copying(batches: Iterator[pa.RecordBatch], directory: str, parts: list[str]) -> Iterator[pa.RecordBatch]:
    """The batches, also written to local Parquet parts of at most PART_ROWS rows (ids included)."""
    writer, rows = None, 0
    try:
        for batch in batches:
            if writer is None or rows >= PART_ROWS:
                if writer is not None:
                    writer.close()
                parts.append(os.path.join(directory, f"part-{len(parts):05d}.parquet"))
                writer, rows = pq.ParquetWriter(parts[-1], batch.schema, compression="zstd"), 0
            writer.write_batch(batch, row_group_size=GROUP_ROWS)
            rows += batch.num_rows
            yield batch
    finally:
        if writer is not None:
            writer.close()


def prepare(cfg, storage_options: dict | None = None) -> PreparedData:
    """Check the data and tokenise the steps the run trains on (streaming), before the run exists."""
    d = cfg.data
    so = storage_options or None
    tokenizer = load_tokenizer(d.tokenizer)
    encode = lambda batch: rows_of(batch, tokenizer, d.seq_len, what="the training data")  # noqa: E731
    scratch, parts, ref, copy = None, [], None, None
    if d.train is None:
        b = d.builtin
        copy, validation = builtin_corpus(n_train=b.n_train, n_validation=b.n_validation,
                                          corrupted_fraction=b.corrupted_fraction, seed=cfg.train.seed,
                                          max_chars=d.builtin_max_chars)
        batches, n = iter(copy.to_batches(max_chunksize=BATCH_ROWS)), copy.num_rows
    else:
        files = listing(d.train, so)
        n = sum(f.rows for f in files)
        if n == 0:
            raise DataError(f"dataset {d.train} is empty (no rows)")
        validation = pa.Table.from_batches(list(scan(d.validation, so, d.pretokenized)))
        check_unique_ids(validation["id"].to_numpy(), f"validation dataset {d.validation}")
        batches = scan(d.train, so, d.pretokenized)
        if not d.copy and in_store([f.url for f in files], cfg.store.uri):
            ref = {"spec": d.train, "pretokenized": d.pretokenized, "files": [asdict(f) for f in files],
                   "digest": digest(files)}
        else:
            scratch = tempfile.TemporaryDirectory(prefix="rayattr-copy-")
            batches = _copying(batches, scratch.name, parts)
    TokenizedDataset(validation, tokenizer, d.seq_len)  # bad validation rows fail here, not in reduce
    try:
        try:
            lay = layout_of(cfg, n)
        except DataError:
            for _ in batches:  # what is wrong with the files themselves is said first
                pass
            raise
        spill = spill_tokens(batches, lay, encode)
    except BaseException:
        if scratch is not None:
            scratch.cleanup()
        raise
    if ref is not None:
        ref["with_id"] = _files_have_ids(ref, so)
    return PreparedData(validation=validation, tokens=spill, train_copy=copy, parts=parts, listing=ref,
                        scratch=scratch)


def _files_have_ids(ref: dict, so: dict | None) -> bool:
    fs, path, url = files_of(ref["files"][0]["url"], so)[0]
    return "id" in _dataset([(fs, path)]).schema.names


def _parquet_bytes(table: pa.Table, group_rows: int = GROUP_ROWS) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=group_rows)
    return sink.getvalue()


def write(run, prepared: PreparedData) -> dict:
    """Everything prepared into the run; the token meta last (it marks the data complete).
    Returns the manifest's data fields."""
    try:
        run.write_bytes(VALIDATION, _parquet_bytes(prepared.validation, VALIDATION_GROUP_ROWS))
        if prepared.train_copy is not None:
            run.write_bytes(TRAIN_COPY, _parquet_bytes(prepared.train_copy))
        for i, path in enumerate(prepared.parts):
            with open(path, "rb") as f:
                run.write_bytes(f"{TRAIN_PARTS}/part-{i:05d}.parquet", f.read())
        if prepared.listing is not None:
            run.write_json(LISTING, prepared.listing)
        meta = prepared.tokens.write(run.write_bytes)
        run.write_json(META, meta)
    finally:
        prepared.cleanup()
    how = "referenced" if prepared.listing is not None else "copied"
    out = {"train": how, "n_used": meta["rows_encoded"], "token_files": prepared.tokens.layout.n_files}
    if prepared.listing is not None:
        out.update(files=len(prepared.listing["files"]), digest=prepared.listing["digest"])
    return {"data": out, "n_train": prepared.n_train, "n_sources": len(meta["sources"])}


def complete(run) -> bool:
    return run.exists(META)


def check_data(run) -> None:
    """DataError if the training files a run left where they are changed since it recorded them."""
    if not run.exists(LISTING):
        return
    ref = run.read_json(LISTING)
    recorded = [DataFile.from_dict(f) for f in ref["files"]]
    current = stat_files([f.url for f in recorded], run.options.storage_options or None)
    check_unchanged(recorded, current, f"training data {ref['spec']}")


def rank_tokens(run, rank: int) -> RankTokens:
    """The token shards as `rank` reads them."""
    if not complete(run):
        raise DataError(f"run {run.uri} has no token shards ({META}): its data stage did not finish")
    return RankTokens(run.read_json(META), run.open_read, rank)


def token_meta(run) -> dict:
    return run.read_json(META)


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
    if run.exists(LISTING):
        return _referenced_rows(run, run.read_json(LISTING), want, list(columns))
    rels = [TRAIN_COPY] if run.exists(TRAIN_COPY) else [
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
