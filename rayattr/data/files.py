"""Training/validation datasets from Parquet or JSON Lines files, local or on s3://.

Every file (or every data file under a directory) is read with pyarrow through fsspec, so
any fsspec URL works (local paths, file://, s3:// with s3fs). Files are checked one by one
so an error can name the file it is about.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from rayattr.data.errors import DataError

# File name endings -> reader. JSON Lines means one JSON object per line.
FORMATS: dict[str, str] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
REQUIRED_COLUMNS = ("text", "source")
# How many offending values an error message lists.
_SHOW = 5


def file_format(path: str) -> str | None:
    """"parquet", "jsonl", or None for a name with an unsupported ending."""
    lowered = path.lower()
    for ending, fmt in FORMATS.items():
        if lowered.endswith(ending):
            return fmt
    return None


def _access_errors() -> tuple[type[BaseException], ...]:
    """Errors of reaching a dataset's storage: OS/network errors and their botocore/aiohttp kin."""
    types: list[type[BaseException]] = [OSError]
    try:
        import botocore.exceptions as bce
        types += [bce.BotoCoreError, bce.ClientError]
    except ImportError:
        pass
    try:
        import aiohttp
        types.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(types)


@contextlib.contextmanager
def _storage_access(uri: str, storage_options: dict | None) -> Iterator[None]:
    """Turn failures to reach a dataset location (network down, wrong endpoint, missing
    credentials, access denied) into a DataError that names the location and the endpoint."""
    try:
        yield
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"dataset file not found: {uri!r}") from None
    except _access_errors() as err:
        endpoint = (storage_options or {}).get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
        at = f" (endpoint {endpoint})" if endpoint and "://" in uri and not uri.startswith("file:") else ""
        kind = type(err).__name__
        if isinstance(err, PermissionError) or "AccessDenied" in str(err) or "Forbidden" in str(err):
            problem = "access denied"
        elif "credential" in kind.lower() or "credentials" in str(err).lower():
            problem = "missing or invalid credentials"
        elif isinstance(err, (ConnectionError, TimeoutError)) or "Connect" in kind or "Timeout" in kind:
            problem = "object store unreachable"
        else:
            problem = "cannot read it"
        raise DataError(f"dataset location {uri!r}{at}: {problem} ({kind}: {err})") from err


def _expand(uri: str, storage_options: dict | None) -> list[tuple[fsspec.AbstractFileSystem, str]]:
    """The data files one URI stands for: itself, or every supported file under it (sorted)."""
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except (ImportError, ValueError) as err:
        raise DataError(f"cannot open dataset location {uri!r}: {err}") from err
    with _storage_access(uri, storage_options):
        return _files_of(fs, path, uri)


def _files_of(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> list[tuple[fsspec.AbstractFileSystem, str]]:
    if not fs.exists(path):
        raise DataError(f"dataset file not found: {uri!r}")
    if fs.isdir(path):
        found = sorted(p for p in fs.find(path) if file_format(p))
        if not found:
            raise DataError(
                f"dataset directory {uri!r} holds no data files (expected endings: "
                f"{', '.join(FORMATS)})")
        return [(fs, p) for p in found]
    if file_format(path) is None:
        raise DataError(
            f"dataset file {uri!r} has an unsupported ending; expected one of {', '.join(FORMATS)}")
    return [(fs, path)]


def _read(fs: fsspec.AbstractFileSystem, path: str, name: str) -> pa.Table:
    if file_format(path) == "jsonl" and fs.size(path) == 0:
        return pa.table({})  # pyarrow rejects empty JSON input; an empty shard is just 0 rows
    try:
        with fs.open(path, "rb") as f:
            if file_format(path) == "parquet":
                return pq.read_table(f)
            return pajson.read_json(f)
    except pa.ArrowInvalid as err:
        raise DataError(f"cannot parse dataset file {name!r}: {err}") from err


def _is_text(dtype: pa.DataType) -> bool:
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) \
        or pa.types.is_string_view(dtype)


def _checked_columns(table: pa.Table, name: str) -> dict[str, pa.ChunkedArray]:
    """text/source (as string) and id (as int64, if present) of one file, or a DataError."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(
            f"dataset file {name!r} lacks required column(s) {missing}; "
            f"it has columns {table.column_names}")
    out: dict[str, pa.ChunkedArray] = {}
    for column in REQUIRED_COLUMNS:
        values = table[column]
        if not _is_text(values.type):
            raise DataError(
                f"column {column!r} in dataset file {name!r} must hold strings, "
                f"found type {values.type}")
        if values.null_count:
            raise DataError(f"column {column!r} in dataset file {name!r} has "
                            f"{values.null_count} null value(s)")
        out[column] = values.cast(pa.string())
    # a sample must say where it comes from: "" would be a source of its own in every answer
    empty = np.flatnonzero(pc.equal(out["source"], "").to_numpy(zero_copy_only=False))
    if len(empty):
        raise DataError(f"column 'source' in dataset file {name!r} has {len(empty)} empty value(s), "
                        f"e.g. row(s) {empty[:_SHOW].tolist()}")
    if "id" in table.column_names:
        ids = table["id"]
        if not pa.types.is_integer(ids.type):
            raise DataError(f"column 'id' in dataset file {name!r} must hold integers, "
                            f"found type {ids.type}")
        if ids.null_count:
            raise DataError(f"column 'id' in dataset file {name!r} has {ids.null_count} null value(s)")
        try:
            out["id"] = ids.cast(pa.int64())
        except pa.ArrowInvalid as err:  # uint64 beyond int64 range
            raise DataError(f"column 'id' in dataset file {name!r} does not fit int64: {err}") from err
    return out


def check_unique_ids(ids: np.ndarray, what: str) -> None:
    """DataError naming a few duplicated ids if ids are not unique."""
    values, counts = np.unique(ids, return_counts=True)
    dups = values[counts > 1]
    if len(dups):
        raise DataError(f"{what} has {len(dups)} duplicated sample id(s), e.g. "
                        f"{dups[:_SHOW].tolist()}")


def load_dataset(uri_or_list: str | os.PathLike | Sequence[str | os.PathLike],
                 storage_options: dict | None = None) -> pa.Table:
    """Read a dataset into a table with columns id (int64), source (string), text (string).

    uri_or_list: one path/URL or a list of them; each may be a Parquet (.parquet/.pq) or
    JSON Lines (.jsonl/.ndjson) file, or a directory searched recursively for such files
    (read in sorted path order). storage_options go to fsspec (e.g. s3fs endpoint/keys).
    Columns text and source are required; id is optional, but then it must be in every
    file. Without it, ids are the global row order 0..N-1 (files in the given order, each
    directory's files sorted), which is stable for an unchanged dataset. Other columns
    are dropped.
    """
    uris = [uri_or_list] if isinstance(uri_or_list, (str, os.PathLike)) else list(uri_or_list)
    if not uris:
        raise DataError("load_dataset got an empty list of dataset locations")
    parts: list[tuple[str, dict[str, pa.ChunkedArray]]] = []
    for uri in uris:
        for fs, path in _expand(os.fspath(uri), storage_options):
            # Local files are named by plain path, remote ones by full URL (s3://bucket/key).
            name = path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)
            with _storage_access(name, storage_options):
                table = _read(fs, path, name)
            if table.num_rows == 0:
                continue  # an empty shard contributes nothing; an all-empty dataset fails below
            parts.append((name, _checked_columns(table, name)))
    what = f"dataset {[os.fspath(u) for u in uris]}"
    if not parts:
        raise DataError(f"{what} is empty (no rows)")
    with_id = [name for name, cols in parts if "id" in cols]
    if with_id and len(with_id) != len(parts):
        without = [name for name, cols in parts if "id" not in cols]
        raise DataError(f"{what}: column 'id' is in some files but missing from "
                        f"{without[:_SHOW]}; give ids everywhere or nowhere")
    texts = pa.chunked_array([c for _, cols in parts for c in cols["text"].chunks], pa.string())
    sources = pa.chunked_array([c for _, cols in parts for c in cols["source"].chunks], pa.string())
    if with_id:
        ids = pa.chunked_array([c for _, cols in parts for c in cols["id"].chunks], pa.int64())
        check_unique_ids(ids.to_numpy(), what)
    else:
        ids = pa.chunked_array([pa.array(np.arange(len(texts)), pa.int64())])
    return pa.table({"id": ids, "source": sources, "text": texts})
