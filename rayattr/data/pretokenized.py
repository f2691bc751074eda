"""Pre-tokenised rows: an `input_ids` list column of token ids, as Megatron and HuggingFace
pipelines hand data over (config data.pretokenized). Rows are used as they are: no eos is
added, nothing is truncated (a row longer than data.seq_len is an error, not silently cut),
and every id must lie below the tokenizer's vocab_size (the model's embedding rows)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayattr.data.errors import DataError

_SHOW = 5


def check_token_type(dtype: pa.DataType, what: str) -> None:
    """DataError unless `dtype` is a list (list, large_list, list_view or fixed_size_list) of integers."""
    is_list = (pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype)
               or pa.types.is_list_view(dtype) or pa.types.is_large_list_view(dtype))
    if not is_list or not pa.types.is_integer(dtype.value_type):
        raise DataError(f"column 'input_ids' in {what} must hold lists of integer token ids, found type {dtype}")


def token_matrix(values: pa.Array | pa.ChunkedArray, ids: np.ndarray, seq_len: int, vocab_size: int,
                 pad_id: int, what: str, where=None) -> tuple[np.ndarray, np.ndarray]:
    """(n, seq_len) int64 rows right-padded with pad_id and (n,) lengths from a list column of
    token ids, or a DataError naming `what` and the offending sample ids (and, given where(rows),
    their file and rows)."""
    at = where or (lambda rows: "")
    check_token_type(values.type, what)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if pa.types.is_list_view(values.type) or pa.types.is_large_list_view(values.type):
        values = values.cast(pa.large_list(values.type.value_type))
    if values.null_count:
        bad = np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))
        raise DataError(f"column 'input_ids' in {what} has {len(bad)} null row(s), e.g. sample id(s) "
                        f"{ids[bad[:_SHOW]].tolist()}{at(bad)}")
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False).astype(np.int64)
    for bad, problem in ((lengths == 0, "are empty"), (lengths > seq_len, f"are longer than data.seq_len = {seq_len}")):
        if bad.any():
            rows = np.flatnonzero(bad)
            raise DataError(f"{len(rows)} row(s) of column 'input_ids' in {what} {problem} (lengths "
                            f"{lengths[rows[:_SHOW]].tolist()}), e.g. sample id(s) {ids[rows[:_SHOW]].tolist()}{at(rows)}; "
                            "pre-tokenised rows are used as they are, so split or cut them first")
    flat = pc.list_flatten(values)
    if flat.null_count:
        raise DataError(f"column 'input_ids' in {what} has {flat.null_count} null token id(s)")
    tokens = flat.to_numpy(zero_copy_only=False).astype(np.int64)
    out_of_range = (tokens < 0) | (tokens >= vocab_size)
    if out_of_range.any():
        row = np.repeat(np.arange(len(lengths)), lengths)[out_of_range]
        raise DataError(f"column 'input_ids' in {what} has {int(out_of_range.sum())} token id(s) outside the "
                        f"tokenizer's vocabulary [0, {vocab_size}), e.g. {tokens[out_of_range][:_SHOW].tolist()} "
                        f"in sample id(s) {np.unique(ids[row])[:_SHOW].tolist()}{at(np.unique(row))}; set data.tokenizer to the "
                        "tokenizer that made them")
    matrix = np.full((len(lengths), seq_len), pad_id, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    matrix[np.repeat(np.arange(len(lengths)), lengths), np.arange(len(tokens)) - np.repeat(starts, lengths)] = tokens
    return matrix, lengths
