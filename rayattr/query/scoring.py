"""Streamed scoring: stored per-occurrence embeddings against query gradients.

The embeddings (layers x p floats per occurrence) are read step window by step window and
never held together; only the scores (Q floats per occurrence) are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rayattr.embed.segment import FINAL_KIND
from rayattr.query.errors import QueryError
from rayattr.store import GradientReader, Run


@dataclass
class OccurrenceScores:
    """Influence of every stored occurrence on each query (+ = helpful), in step order."""

    sample_ids: np.ndarray
    """(N,) int64 training sample id of each occurrence."""
    sources: np.ndarray
    """(N,) object: source of each occurrence."""
    steps: np.ndarray
    """(N,) int64 optimizer step of each occurrence."""
    scores: np.ndarray
    """(N, Q) float64: dot(final embedding, query gradient) summed over layers."""

    def __len__(self) -> int:
        return len(self.sample_ids)


def embedding_reader(run: Run, window_bytes: int = 64 << 20) -> GradientReader:
    """Reader of the run's final per-occurrence embeddings, with a clear error if there are none."""
    reader = GradientReader(run, kind=FINAL_KIND, window_bytes=window_bytes)
    if not reader.committed_steps():
        raise QueryError(f"run {run.uri} has no per-occurrence embeddings: it was made with "
                         "embed.keep_sample_embeddings = false, so only source-level values exist "
                         "(use `rayattr values`)")
    return reader


class _Chunk:
    """Step batches buffered until a chunk is large enough for efficient products."""

    def __init__(self):
        self.batches = []
        self.rows = 0

    def add(self, batch) -> None:
        self.batches.append(batch)
        self.rows += len(batch)

    def score(self, test: dict[str, torch.Tensor]) -> torch.Tensor:
        """(rows, Q): one (rows x p) @ (p x Q) product per layer."""
        total = None
        for name, g in test.items():
            e = torch.cat([b.grads[name] for b in self.batches]) if len(self.batches) > 1 \
                else self.batches[0].grads[name]
            s = e @ g.T
            total = s if total is None else total.add_(s)
        return total


def score_occurrences(run: Run, test_grads: dict[str, torch.Tensor], chunk_rows: int = 4096,
                      reader: GradientReader | None = None) -> OccurrenceScores:
    """Dot products of every stored final embedding with each query gradient.

    test_grads: layer -> (Q, p) (or (p,) for one query). Rows are scored `chunk_rows` at a
    time in float32 (the embeddings' stored precision) and kept in float64.
    """
    reader = reader or embedding_reader(run)
    missing = sorted(set(reader.layers) - set(test_grads))
    if missing:
        raise QueryError(f"query gradients lack layers {missing} of run {run.uri}")
    test = {n: (g if g.ndim == 2 else g[None]).to(torch.float32).contiguous()
            for n, g in test_grads.items() if n in reader.layers}
    q = next(iter(test.values())).shape[0]
    ids, sources, steps, scores = [], [], [], []
    chunk = _Chunk()

    def flush():
        nonlocal chunk
        if chunk.rows:
            scores.append(chunk.score(test).double().numpy())
            for b in chunk.batches:
                ids.append(b.sample_ids.numpy())
                sources.extend(b.sources)
                steps.append(np.full(len(b), b.step, dtype=np.int64))
        chunk = _Chunk()

    for batch in reader.iter_steps(layers=list(test)):
        chunk.add(batch)
        if chunk.rows >= chunk_rows:
            flush()
    flush()
    if not scores:
        return OccurrenceScores(np.zeros(0, np.int64), np.zeros(0, object), np.zeros(0, np.int64),
                                np.zeros((0, q)))
    return OccurrenceScores(np.concatenate(ids), np.asarray(sources, dtype=object),
                            np.concatenate(steps), np.concatenate(scores))
