"""Gradient shards: Arrow IPC files with one record batch per step.

Columns: step int64, sample_id int64, source string, position int64, rank int32, then one
fixed_size_list<p> column per layer (float32, float16, or bfloat16 stored as uint16 bits).
Arrow IPC was chosen over Parquet after measuring (bench/store_throughput.py): ~2x faster to
write and ~20x faster to read for dense float rows, with the same random access by batch.
Every batch's byte range is recorded (with its sha256) so a reader fetches and verifies only
the steps it needs plus the small header and footer.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from .commits import Part, sha256_hex  # noqa: F401 - reader and writer import it from here
from .errors import StoreError

META_COLUMNS = ("step", "sample_id", "source", "position", "rank")
_MAGIC_LEN = 8  # b"ARROW1\0\0": magic plus padding at the start of an IPC file

# storage dtype name -> (arrow value type, torch dtype used for the bytes)
STORAGE_DTYPES: dict[str, tuple[pa.DataType, torch.dtype]] = {
    "float64": (pa.float64(), torch.float64),  # embeddings of embed.dtype float64
    "float32": (pa.float32(), torch.float32),
    "float16": (pa.float16(), torch.float16),
    "bfloat16": (pa.uint16(), torch.bfloat16),  # Arrow has no bfloat16: keep the raw bits
}


def check_dtype(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in STORAGE_DTYPES:
        raise StoreError(f"unsupported gradient storage dtype {dtype!r}: choose one of "
                         f"{sorted(STORAGE_DTYPES)}")
    return dtype


def shard_schema(layers: dict[str, int], dtype: str, kind: str) -> pa.Schema:
    value_type = STORAGE_DTYPES[dtype][0]
    fields = [pa.field("step", pa.int64()), pa.field("sample_id", pa.int64()),
              pa.field("source", pa.string()), pa.field("position", pa.int64()),
              pa.field("rank", pa.int32())]
    fields += [pa.field(name, pa.list_(value_type, p)) for name, p in layers.items()]
    return pa.schema(fields, metadata={"rayattr.kind": kind, "rayattr.dtype": dtype,
                                       "rayattr.format": "1"})


def tensor_to_column(t: torch.Tensor, dtype: str, p: int) -> pa.FixedSizeListArray:
    """(B, p) tensor -> fixed_size_list column; always copies (the caller may reuse t)."""
    torch_dtype = STORAGE_DTYPES[dtype][1]
    flat = t.detach().to(device="cpu", dtype=torch_dtype, copy=True).reshape(-1)
    arr = flat.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else flat.numpy()
    return pa.FixedSizeListArray.from_arrays(pa.array(arr), p)


def step_batch(schema: pa.Schema, step: int, rank: int, sample_ids: Sequence[int],
               sources: Sequence[str], positions: Sequence[int], grads: dict[str, torch.Tensor],
               dtype: str) -> pa.RecordBatch:
    n = len(sample_ids)
    cols = [pa.array(np.full(n, step, np.int64)), pa.array(np.asarray(sample_ids, np.int64)),
            pa.array(list(sources), pa.string()), pa.array(np.asarray(positions, np.int64)),
            pa.array(np.full(n, rank, np.int32))]
    for f in schema:
        if f.name not in META_COLUMNS:
            cols.append(tensor_to_column(grads[f.name], dtype, f.type.list_size))
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def _sha(b) -> str:
    return hashlib.sha256(b).hexdigest()


def encode_shard(schema: pa.Schema, batches: Sequence[pa.RecordBatch], steps: Sequence[int],
                 compression: str | None = None) -> tuple[pa.Buffer, Part, Part, list[Part]]:
    """IPC file bytes plus the byte ranges (with checksums) of header, footer and each step."""
    sink = pa.BufferOutputStream()
    opts = pa.ipc.IpcWriteOptions(compression=compression)
    ends = []
    with pa.ipc.new_file(sink, schema, options=opts) as w:
        for b in batches:
            w.write_batch(b)
            ends.append(sink.tell())
    buf = sink.getvalue()
    view = memoryview(buf)
    header_len = _MAGIC_LEN + schema.serialize().size
    if bytes(view[_MAGIC_LEN:header_len]) != schema.serialize().to_pybytes():
        raise StoreError("internal: unexpected Arrow IPC file layout (schema message not first)")
    starts = [header_len] + ends[:-1]
    parts = [Part(s, e - s, _sha(view[s:e]), step, i, batches[i].num_rows)
             for i, (s, e, step) in enumerate(zip(starts, ends, steps))]
    header = Part(0, header_len, _sha(view[:header_len]))
    foot_start = ends[-1] if ends else header_len
    footer = Part(foot_start, buf.size - foot_start, _sha(view[foot_start:]))
    return buf, header, footer, parts


def merge_ranges(parts: Sequence[Part]) -> list[tuple[int, int]]:
    """Coalesce parts into contiguous [start, end) ranges (consecutive steps are adjacent)."""
    out: list[list[int]] = []
    for p in sorted(parts, key=lambda p: p.offset):
        if out and p.offset <= out[-1][1]:
            out[-1][1] = max(out[-1][1], p.end)
        else:
            out.append([p.offset, p.end])
    return [(a, b) for a, b in out]


def open_sparse(size: int, chunks: Sequence[tuple[int, bytes]]) -> pa.ipc.RecordBatchFileReader:
    """IPC reader over a file of which only `chunks` (offset, bytes) were fetched."""
    if len(chunks) == 1 and chunks[0][0] == 0 and len(chunks[0][1]) == size:
        return pa.ipc.open_file(pa.py_buffer(chunks[0][1]))
    buf = np.zeros(size, np.uint8)  # calloc: pages never written are never touched
    for off, data in chunks:
        buf[off:off + len(data)] = np.frombuffer(data, np.uint8)
    return pa.ipc.open_file(pa.py_buffer(buf))


def column_to_tensor(col: pa.FixedSizeListArray, dtype: str) -> torch.Tensor:
    """fixed_size_list column -> (rows, p) tensor in the storage dtype, sharing memory."""
    p = col.type.list_size
    values = col.flatten().to_numpy(zero_copy_only=True)
    if dtype == "bfloat16":
        values = values.view(np.int16)
    with warnings.catch_warnings():  # Arrow memory is read-only; callers copy before handing out
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(values)
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.reshape(len(col), p)
