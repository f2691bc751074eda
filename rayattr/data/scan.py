"""The training data as a stream of checked record batches, and the listing that pins it.

A scan reads one file at a time through pyarrow.dataset, a record batch at a time, and only the
columns asked for, so no process ever holds a whole corpus. Each batch comes out with the
columns id (int64), source (string) and the body (`text` strings, or pre-tokenised `input_ids`
lists); without an `id` column, ids are the global row order, as in files.load_dataset.

The listing (`DataFile` per file: URL, size, version, rows) is what a run records when it
leaves data where it is (docs/store.md): a run checks it again before it uses the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from pyarrow.fs import FSSpecHandler, PyFileSystem

from rayattr.data.errors import DataError
from rayattr.data.limits import BATCH_ROWS
from rayattr.data.files import _expand, _is_text, _storage_access, file_format
from rayattr.data.pretokenized import check_token_type

_SHOW = 5


@dataclass(frozen=True)
class DataFile:
    """One data file as a run pins it."""

    url: str  # local path or full URL (s3://bucket/key)
    size: int  # bytes
    version: str  # ETag on S3, modification time (ns) locally: changes when the file is rewritten
    rows: int  # rows in the file
    id_min: int | None = None  # smallest and largest id (Parquet statistics), so a lookup by id
    id_max: int | None = None  # opens only the files that can hold it

    @classmethod
    def from_dict(cls, d: dict) -> "DataFile":
        return cls(url=d["url"], size=int(d["size"]), version=str(d["version"]), rows=int(d["rows"]),
                   id_min=d.get("id_min"), id_max=d.get("id_max"))


def files_of(uri_or_list, storage_options: dict | None) -> list[tuple[fsspec.AbstractFileSystem, str, str]]:
    """(fs, path, url) of every data file a data spec names, in the order rows are numbered."""
    uris = [uri_or_list] if isinstance(uri_or_list, (str, os.PathLike)) else list(uri_or_list)
    if not uris:
        raise DataError("got an empty list of dataset locations")
    out = []
    for uri in uris:
        for fs, path in _expand(os.fspath(uri), storage_options):
            url = path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)
            out.append((fs, path, url))
    return out


def _version(info: dict) -> str:
    """What changes when a file is rewritten: the ETag on S3, else the modification time."""
    for key in ("ETag", "etag"):
        if info.get(key):
            return str(info[key]).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    return str(getattr(mtime, "isoformat", lambda: mtime)())


def _dataset(fs: fsspec.AbstractFileSystem, path: str) -> ds.Dataset:
    fmt = "parquet" if file_format(path) == "parquet" else "json"
    filesystem = None if isinstance(fs, LocalFileSystem) else PyFileSystem(FSSpecHandler(fs))
    return ds.dataset(path, format=fmt, filesystem=filesystem)


def _empty(fs, path: str) -> bool:
    """pyarrow rejects empty JSON input; an empty shard is just 0 rows."""
    return file_format(path) == "jsonl" and fs.size(path) == 0


def body_column(pretokenized: bool) -> str:
    return "input_ids" if pretokenized else "text"


def _checked_schema(schema: pa.Schema, url: str, pretokenized: bool) -> bool:
    """Whether the file has ids; a DataError naming the file and column if a column is wrong."""
    body = body_column(pretokenized)
    required = (body,) if pretokenized else (body, "source")
    missing = [c for c in required if c not in schema.names]
    if missing:
        hint = " (data.pretokenized is set: files need an input_ids list column)" if pretokenized else ""
        raise DataError(f"dataset file {url!r} lacks required column(s) {missing}; it has columns "
                        f"{schema.names}{hint}")
    for column in ("text", "source"):
        if column in schema.names and (column == "source" or not pretokenized) and not _is_text(schema.field(column).type):
            raise DataError(f"column {column!r} in dataset file {url!r} must hold strings, "
                            f"found type {schema.field(column).type}")
    if pretokenized:
        check_token_type(schema.field("input_ids").type, f"dataset file {url!r}")
    if "id" in schema.names and not pa.types.is_integer(schema.field("id").type):
        raise DataError(f"column 'id' in dataset file {url!r} must hold integers, found type {schema.field('id').type}")
    return "id" in schema.names


def _rows_named(mask: np.ndarray, first_row: int) -> str:
    rows = np.flatnonzero(mask)
    return f"e.g. row(s) {(rows[:_SHOW] + first_row).tolist()}"


def _checked_batch(batch: pa.RecordBatch, url: str, pretokenized: bool, first_id: int, has_id: bool,
                   default_source: str, first_row: int = 0) -> pa.RecordBatch:
    """id (int64), source (string) and the body column of one batch, checked like files.load_dataset;
    errors name the file and the rows (first_row: the batch's first row in the file)."""
    body = body_column(pretokenized)
    n = batch.num_rows
    if has_id:
        ids = batch["id"]
        if ids.null_count:
            raise DataError(f"column 'id' in dataset file {url!r} has {ids.null_count} null value(s), "
                            f"{_rows_named(ids.is_null().to_numpy(zero_copy_only=False), first_row)}")
        try:
            ids = ids.cast(pa.int64())
        except pa.ArrowInvalid as err:  # uint64 beyond int64 range
            raise DataError(f"column 'id' in dataset file {url!r} does not fit int64: {err}") from err
    else:
        ids = pa.array(np.arange(first_id, first_id + n), pa.int64())
    if "source" in batch.schema.names:
        sources = batch["source"]
        if sources.null_count:
            raise DataError(f"column 'source' in dataset file {url!r} has {sources.null_count} null value(s), "
                            f"{_rows_named(sources.is_null().to_numpy(zero_copy_only=False), first_row)}")
        sources = sources.cast(pa.string())
        # a sample must say where it comes from: "" would be a source of its own in every answer
        empty = pc.equal(sources, "").to_numpy(zero_copy_only=False)
        if empty.any():
            raise DataError(f"column 'source' in dataset file {url!r} has {int(empty.sum())} empty value(s), "
                            f"{_rows_named(empty, first_row)}")
    else:  # pre-tokenised files may leave it out: the file is the source, as in a Megatron blend
        sources = pa.array([default_source] * n, pa.string())
    arrays, names = [ids, sources], ["id", "source"]
    if body in batch.schema.names:
        values = batch[body]
        if values.null_count:
            raise DataError(f"column {body!r} in dataset file {url!r} has {values.null_count} null value(s), "
                            f"{_rows_named(values.is_null().to_numpy(zero_copy_only=False), first_row)}")
        arrays.append(values if pretokenized else values.cast(pa.string()))
        names.append(body)
    return pa.RecordBatch.from_arrays(arrays, names=names)


def default_source(url: str) -> str:
    """The source of a pre-tokenised file without a source column: its name without the ending."""
    name = posixpath.basename(url.rstrip("/"))
    return name.split(".", 1)[0] or name


def file_batches(fs, path: str, url: str, pretokenized: bool, with_id: bool | None, first_position: int,
                 columns: Sequence[str] | None = None, batch_rows: int = BATCH_ROWS,
                 storage_options: dict | None = None) -> Iterator[pa.RecordBatch]:
    """Checked record batches of one data file (see module docstring); first_position is the
    global row number of its first row (the ids of files without an id column). with_id: whether
    the other files have ids (None: not known yet), a DataError if this one disagrees."""
    body = body_column(pretokenized)
    wanted = list(columns or ("id", "source", body))
    with _storage_access(url, storage_options):
        if _empty(fs, path):
            return
        dataset = _dataset(fs, path)
        try:
            has_id = _checked_schema(dataset.schema, url, pretokenized)
            if with_id is not None and with_id != has_id:
                raise DataError(f"column 'id' is in some files but missing from {url!r}; give ids everywhere "
                                "or nowhere")
            # ids and sources are always read (they are checked); the body only when asked for
            read = [c for c in ("id", "source", body) if c in dataset.schema.names and (c != body or body in wanted)]
            row = 0
            for batch in dataset.to_batches(columns=read, batch_size=batch_rows):
                if batch.num_rows == 0:
                    continue
                out = _checked_batch(batch, url, pretokenized, first_position + row, has_id, default_source(url), row)
                row += batch.num_rows
                yield out.select(wanted)
        except pa.ArrowInvalid as err:
            raise DataError(f"cannot parse dataset file {url!r}: {err}") from err


def check_columns(files: Sequence["DataFile"], storage_options: dict | None, pretokenized: bool) -> None:
    """Every file's columns and types from its schema (a Parquet footer, a JSON Lines file's first
    block), and ids in every file or in none: what can be said before any row is read."""
    with_id: dict[bool, str] = {}
    for f in files:
        fs, path, url = files_of(f.url, storage_options)[0]
        with _storage_access(url, storage_options):
            if _empty(fs, path):
                continue
            try:
                has_id = _checked_schema(_dataset(fs, path).schema, url, pretokenized)
            except pa.ArrowInvalid as err:
                raise DataError(f"cannot parse dataset file {url!r}: {err}") from err
        with_id.setdefault(has_id, url)
    if len(with_id) > 1:
        raise DataError(f"column 'id' is in some files but missing from {with_id[False]!r}; give ids everywhere "
                        "or nowhere")


def has_ids(fs, path: str, url: str) -> bool:
    """Whether a data file has an id column (its schema: the footer, or a JSON Lines file's first block)."""
    with _storage_access(url, None):
        try:
            return "id" in _dataset(fs, path).schema.names
        except pa.ArrowInvalid as err:
            raise DataError(f"cannot parse dataset file {url!r}: {err}") from err


def scan(uri_or_list, storage_options: dict | None = None, pretokenized: bool = False,
         columns: Sequence[str] | None = None, batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Checked record batches of every data file in row order, in this process (see module
    docstring); the training data's stage reads the same way in Ray tasks (data/stage.py).

    columns: which of id, source and the body to return (default all three); a scan for ids
    and sources alone never reads the texts or tokens.
    """
    what = f"dataset {uri_or_list if isinstance(uri_or_list, (str, os.PathLike)) else list(uri_or_list)}"
    with_id: bool | None = None
    position = 0
    for fs, path, url in files_of(uri_or_list, storage_options):
        with _storage_access(url, storage_options):
            for batch in file_batches(fs, path, url, pretokenized, with_id, position, columns, batch_rows,
                                      storage_options):
                if with_id is None:
                    with_id = has_ids(fs, path, url)
                position += batch.num_rows
                yield batch
    if position == 0:
        raise DataError(f"{what} is empty (no rows)")


def listing(uri_or_list, storage_options: dict | None = None, count_rows: bool = True,
            count_jsonl: Callable[[list[str]], list[int]] | None = None) -> list[DataFile]:
    """Every data file's URL, size, version and rows: what pins the data a run uses. Parquet rows
    come from the footer; JSON Lines files are counted by a scan, here or by count_jsonl(urls)
    (the data stage counts them in Ray tasks). count_rows=False: rows -1 (a check against a
    recorded listing needs only URL, size and version)."""
    out = []
    later: list[int] = []
    for fs, path, url in files_of(uri_or_list, storage_options):
        with _storage_access(url, storage_options):
            info = fs.info(path)
            lo = hi = None
            if not count_rows:
                rows = -1
            elif _empty(fs, path):
                rows = 0
            else:
                try:
                    if file_format(path) == "parquet":
                        with fs.open(path, "rb") as f:
                            meta = pq.ParquetFile(f).metadata
                        rows, (lo, hi) = meta.num_rows, _id_range(meta)
                    elif count_jsonl is not None:
                        rows = -1
                        later.append(len(out))
                    else:
                        rows = _dataset(fs, path).count_rows()
                except pa.ArrowInvalid as err:
                    raise DataError(f"cannot parse dataset file {url!r}: {err}") from err
        out.append(DataFile(url=url, size=int(info.get("size") or 0), version=_version(info), rows=rows,
                            id_min=lo, id_max=hi))
    if later:
        counts = count_jsonl([out[i].url for i in later])
        for i, rows in zip(later, counts):
            out[i] = DataFile(**{**asdict(out[i]), "rows": int(rows)})
    return out


def count_rows(url: str, storage_options: dict | None) -> int:
    """Rows of one data file (a JSON Lines file is parsed whole: what a task does, not a driver)."""
    fs, path, _ = files_of(url, storage_options)[0]
    with _storage_access(url, storage_options):
        if _empty(fs, path):
            return 0
        try:
            return _dataset(fs, path).count_rows()
        except pa.ArrowInvalid as err:
            raise DataError(f"cannot parse dataset file {url!r}: {err}") from err


def _id_range(meta: pq.FileMetaData) -> tuple[int | None, int | None]:
    """Smallest and largest value of the file's integer `id` column from its row-group
    statistics, or (None, None) where there is no such column or statistics."""
    column = next((i for i in range(meta.num_columns) if meta.schema.column(i).path == "id"), None)
    if column is None or meta.num_row_groups == 0:
        return None, None
    stats = [meta.row_group(g).column(column).statistics for g in range(meta.num_row_groups)]
    if not all(s is not None and s.has_min_max and isinstance(s.min, int) for s in stats):
        return None, None
    return min(s.min for s in stats), max(s.max for s in stats)


def stat_files(urls: Sequence[str], storage_options: dict | None = None) -> list[DataFile]:
    """URL, size and version (rows -1) of each of these files that still exists."""
    out = []
    for url in urls:
        with _storage_access(url, storage_options):
            fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
            if fs.exists(path):
                info = fs.info(path)
                out.append(DataFile(url=url, size=int(info.get("size") or 0), version=_version(info), rows=-1))
    return out


def digest(files: Sequence[DataFile]) -> str:
    """sha256 of a listing: equal listings, equal digests."""
    return hashlib.sha256(json.dumps([asdict(f) for f in files], sort_keys=True).encode()).hexdigest()


def check_unchanged(recorded: Sequence[DataFile], current: Sequence[DataFile], what: str) -> None:
    """DataError naming the first files that differ if the data changed since it was recorded
    (URL, size and version are compared: rows follow from the content)."""
    key = lambda files: [(f.url, f.size, f.version) for f in files]  # noqa: E731
    if key(recorded) == key(current):
        return
    old, new = {f.url: f for f in recorded}, {f.url: f for f in current}
    changes = [f"{u} is gone" for u in old if u not in new] + [f"{u} is new" for u in new if u not in old]
    for u in old.keys() & new.keys():
        if old[u] != new[u]:
            diff = [f"{k} {getattr(old[u], k)} -> {getattr(new[u], k)}" for k in ("size", "version")
                    if getattr(old[u], k) != getattr(new[u], k)]
            if diff:
                changes.append(f"{u}: {', '.join(diff)}")
    if not changes:
        changes = ["the files are listed in another order"]
    raise DataError(f"{what} changed since the run recorded it: {'; '.join(sorted(changes)[:_SHOW])}. The run's "
                    "tokens and texts would no longer match; restore the data or start a new run")
