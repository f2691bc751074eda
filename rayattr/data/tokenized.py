"""A dataset table tokenised once into fixed-length, right-padded tensors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from rayattr.data.errors import DataError
from rayattr.data.files import check_unique_ids
from rayattr.data.tokenizer import Tokenizer

# Label value the HuggingFace / torch cross-entropy losses skip.
IGNORE_INDEX = -100


class TokenizedDataset:
    """Rows of an (id, source, text) table as tensors, aligned row for row with the table.

    Each text is encoded (plus eos when add_eos and the tokenizer has one), truncated to
    seq_len (counted in num_truncated) and right-padded with tokenizer.pad_id.

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
        missing = [c for c in ("id", "source", "text") if c not in table.column_names]
        if missing:
            raise DataError(f"TokenizedDataset needs columns id, source, text; missing {missing} "
                            f"(table has {table.column_names})")
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        if table.num_rows == 0:
            raise DataError("TokenizedDataset got an empty table")
        self.seq_len = seq_len
        self.tokenizer = tokenizer
        ids = table["id"].to_numpy().astype(np.int64)
        check_unique_ids(ids, "TokenizedDataset table")
        texts = table["text"].to_pylist()
        self.sources: list[str] = table["source"].to_pylist()

        eos = tokenizer.eos_id if add_eos else None
        input_ids = np.full((len(texts), seq_len), tokenizer.pad_id, dtype=np.int64)
        lengths = np.zeros(len(texts), dtype=np.int64)
        truncated = 0
        for row, text in enumerate(texts):
            tokens = tokenizer.encode(text)
            if eos is not None:
                tokens.append(eos)
            if not tokens:
                raise DataError(f"sample id {ids[row]} encodes to no tokens (empty text and no eos)")
            if len(tokens) > seq_len:
                truncated += 1
                tokens = tokens[:seq_len]
            input_ids[row, :len(tokens)] = tokens
            lengths[row] = len(tokens)
        self.num_truncated = truncated

        mask = np.arange(seq_len)[None, :] < lengths[:, None]
        self.input_ids = torch.from_numpy(input_ids)
        self.attention_mask = torch.from_numpy(mask.astype(np.int64))
        # Mask by position, not by comparing with pad_id: pad may equal eos (HF fallback).
        self.labels = self.input_ids.masked_fill(~torch.from_numpy(mask), IGNORE_INDEX)
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
