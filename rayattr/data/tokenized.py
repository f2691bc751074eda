"""A dataset table tokenised once into fixed-length, right-padded tensors.

`encode_texts` and `token_matrix` are the one place texts and pre-tokenised rows become padded
token rows: the whole-table `TokenizedDataset` (validation sets, queries) and the streaming
token shards of the training data (data/shards.py) both use them, so both give the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from rayattr.data.errors import DataError
from rayattr.data.files import check_unique_ids
from rayattr.data.pretokenized import token_matrix
from rayattr.data.tokenizer import Tokenizer

# Names rows of a batch by file and row in an error: " (dataset file 'x', row(s) [3, 9])".
Where = Callable[[np.ndarray], str]
# Label value the HuggingFace / torch cross-entropy losses skip.
IGNORE_INDEX = -100


def encode_texts(texts: Sequence[str], ids: np.ndarray, tokenizer: Tokenizer, seq_len: int,
                 add_eos: bool = True, where: Where | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, seq_len) int64 token rows right-padded with pad_id, (n,) real lengths, and (n,) whether
    each row was truncated. Each text is encoded (plus eos when add_eos and the tokenizer has one)
    and cut to seq_len; `ids` (and `where`: the file and row of given rows) only name a row in errors."""
    eos = tokenizer.eos_id if add_eos else None
    input_ids = np.full((len(texts), seq_len), tokenizer.pad_id, dtype=np.int64)
    lengths = np.zeros(len(texts), dtype=np.int64)
    truncated = np.zeros(len(texts), dtype=bool)
    for row, text in enumerate(texts):
        tokens = tokenizer.encode(text)
        if eos is not None:
            tokens.append(eos)
        if not tokens:
            at = where(np.array([row])) if where else ""
            raise DataError(f"sample id {ids[row]}{at} encodes to no tokens (empty text and no eos)")
        if len(tokens) > seq_len:
            truncated[row] = True
            tokens = tokens[:seq_len]
        input_ids[row, :len(tokens)] = tokens
        lengths[row] = len(tokens)
    return input_ids, lengths, truncated


def rows_of(table: pa.Table | pa.RecordBatch, tokenizer: Tokenizer, seq_len: int, add_eos: bool = True,
            what: str = "table", where: Where | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token rows, lengths and truncation flags of a table with a `text` column (encoded) or an
    `input_ids` column (pre-tokenised, checked and used as they are: never truncated)."""
    ids = table["id"].to_numpy()
    if "input_ids" in table.column_names:
        tokens, lengths = token_matrix(table["input_ids"], ids, seq_len, tokenizer.vocab_size,
                                       tokenizer.pad_id, what, where)
        return tokens, lengths, np.zeros(len(lengths), dtype=bool)
    return encode_texts(table["text"].to_pylist(), ids, tokenizer, seq_len, add_eos, where)


class TokenizedDataset:
    """Rows of an (id, source, text) or (id, source, input_ids) table as tensors, aligned row for
    row with the table.

    Each text is encoded (plus eos when add_eos and the tokenizer has one), truncated to
    seq_len (counted in num_truncated) and right-padded with tokenizer.pad_id; pre-tokenised
    rows (an `input_ids` list column) are used as they are (data/pretokenized.py).

    Attributes (N rows, L = seq_len):
      input_ids (N, L) long; attention_mask (N, L) long, 1 on real tokens;
      labels (N, L) long, input_ids with IGNORE_INDEX (-100) at padding; causal-LM models
        shift labels themselves, so none is applied here;
      lengths (N,) long, real tokens per row; ids (N,) long, the table's sample ids;
      sources list[str]; source_names sorted distinct sources; source_index (N,) long,
        each row's position in source_names (for per-source aggregation);
      num_truncated: rows whose tokens did not fit in seq_len.
    """

    def __init__(self, table: pa.Table, tokenizer: Tokenizer, seq_len: int, add_eos: bool = True):
        body = "input_ids" if "input_ids" in table.column_names else "text"
        missing = [c for c in ("id", "source", body) if c not in table.column_names]
        if missing:
            raise DataError(f"TokenizedDataset needs columns id, source, text (or input_ids); missing {missing} "
                            f"(table has {table.column_names})")
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        if table.num_rows == 0:
            raise DataError("TokenizedDataset got an empty table")
        self.seq_len = seq_len
        self.tokenizer = tokenizer
        ids = table["id"].to_numpy().astype(np.int64)
        check_unique_ids(ids, "TokenizedDataset table")
        self.sources: list[str] = table["source"].to_pylist()
        input_ids, lengths, cut = rows_of(table, tokenizer, seq_len, add_eos)
        self.num_truncated = int(cut.sum())
        t = tensors(input_ids, lengths)
        self.input_ids, self.attention_mask, self.labels = t["input_ids"], t["attention_mask"], t["labels"]
        self.lengths = torch.from_numpy(lengths)
        self.ids = torch.from_numpy(ids)
        self.source_names: list[str] = sorted(set(self.sources))
        code = {name: i for i, name in enumerate(self.source_names)}
        self.source_index = torch.tensor([code[s] for s in self.sources], dtype=torch.long)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows at the given positions (e.g. a BatchPlan slice), as a dict of tensors.

        Keys: input_ids, attention_mask, labels, ids, source_index.
        """
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise DataError(f"batch indices must lie in [0, {len(self)}), got "
                            f"min {int(index.min())}, max {int(index.max())}")
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
            "ids": self.ids[index],
            "source_index": self.source_index[index],
        }

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.batch([i]).items()}


def tensors(input_ids: np.ndarray, lengths: np.ndarray) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask (1 on real tokens) and labels (IGNORE_INDEX at padding) as long
    tensors from right-padded token rows and their lengths."""
    mask = np.arange(input_ids.shape[1])[None, :] < np.asarray(lengths)[:, None]
    ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64))
    # Mask by position, not by comparing with pad_id: pad may equal eos (HF fallback).
    return {"input_ids": ids, "attention_mask": torch.from_numpy(mask.astype(np.int64)),
            "labels": ids.masked_fill(~torch.from_numpy(mask), IGNORE_INDEX)}
