"""Streamed scoring: stored per-occurrence embeddings against query gradients.

The embeddings (layers x p floats per occurrence) are read step window by step window and
never held together. `score_blocks` yields each block's scores and keeps nothing (what
`rayattr query` ranks from, query/ranking.py); `score_occurrences` collects every
occurrence's scores (Q floats each), for tests and benches that want them all.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from rayattr.embed.blocks import ProjectionBlocks, is_block
from rayattr.store.layout import FINAL_KIND, RUN_JSON
from rayattr.query.errors import QueryError
from rayattr.store import GradientReader, Run, StoreError


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
    se: np.ndarray | None = None
    """(N, Q) float64: each score's standard error from the projection blocks (None for runs
    made without them)."""

    def subset(self, keep: np.ndarray) -> "OccurrenceScores":
        return OccurrenceScores(self.sample_ids[keep], self.sources[keep], self.steps[keep], self.scores[keep],
                                None if self.se is None else self.se[keep])

    def __len__(self) -> int:
        return len(self.sample_ids)


def embedding_reader(run: Run, window_bytes: int = 64 << 20) -> GradientReader:
    """Reader of the run's final per-occurrence embeddings, with a clear error if there are none."""
    reader = GradientReader(run, kind=FINAL_KIND, window_bytes=window_bytes)
    if not reader.committed_steps() and not run.exists(RUN_JSON):  # not a setting: it is gone
        raise StoreError(f"run {run.uri} was deleted while being read (its run.json is gone)")
    if not reader.committed_steps():
        raise QueryError(f"run {run.uri} has no per-occurrence embeddings: it was made with "
                         "embed.keep_sample_embeddings = false, so only source-level values exist "
                         "(use `rayattr values`)")
    return reader


def _in_background(batches: Iterator, depth: int = 4) -> Iterator:
    """Iterate `batches` on a thread, `depth` items ahead: reading and stacking the next block
    overlaps the products of this one (both release the GIL), so scoring runs at reading speed."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            q.put(err)

    thread = threading.Thread(target=produce, name="rayattr-query-read", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


@dataclass
class _Block:
    """Consecutive steps' rows stacked into one matrix per layer."""

    grads: dict[str, torch.Tensor]
    sample_ids: np.ndarray
    sources: list[str]
    steps: np.ndarray


def _blocks(batches: Iterator, rows: int) -> Iterator[_Block]:
    """Step batches stacked into blocks of about `rows` rows (run on the reading thread, so
    the copies overlap the products of the previous block)."""
    pending: list = []

    def stack() -> _Block:
        names = pending[0].grads
        return _Block({n: torch.cat([b.grads[n] for b in pending]) for n in names},
                      np.concatenate([b.sample_ids.numpy() for b in pending]),
                      [s for b in pending for s in b.sources],
                      np.concatenate([np.full(len(b), b.step, dtype=np.int64) for b in pending]))

    count = 0
    for batch in batches:
        pending.append(batch)
        count += len(batch)
        if count >= rows:
            yield stack()
            pending, count = [], 0
    if pending:
        yield stack()


def score_blocks(run: Run, test_grads: dict[str, torch.Tensor], block_rows: int = 1024,
                 reader: GradientReader | None = None) -> Iterator[OccurrenceScores]:
    """Dot products of every stored final embedding with each query gradient, one block of
    about `block_rows` consecutive occurrences (whole steps, in step order) at a time.

    test_grads: layer -> (Q, p) (or (p,) for one query). Rows are scored in the embeddings'
    stored precision (embed.dtype: float32, or float64); the layers are summed, and the scores
    kept, in float64. Nothing is kept between blocks.
    """
    reader = reader or embedding_reader(run)
    blocks = stored_blocks(run, reader)
    dtype = stored_dtype(run)
    test = {n: (g if g.ndim == 2 else g[None]).to(dtype).contiguous()
            for n, g in test_grads.items() if n in blocks.recorded}
    missing = sorted(set(blocks.recorded) - set(test))
    if missing:
        raise QueryError(f"query gradients lack layers {missing} of run {run.uri}")
    test = blocks.augment(test)
    for block in _in_background(_blocks(reader.iter_steps(layers=list(test), dtype=dtype), block_rows)):
        value, se = blocks.values(block.grads, test)
        yield OccurrenceScores(block.sample_ids, np.asarray(block.sources, dtype=object), block.steps,
                               value.double().numpy(), None if se is None else se.double().numpy())


def score_occurrences(run: Run, test_grads: dict[str, torch.Tensor], block_rows: int = 1024,
                      reader: GradientReader | None = None) -> OccurrenceScores:
    """score_blocks' blocks concatenated: every occurrence's scores at once, O(occurrences)
    memory (`rayattr query` ranks the blocks as they come instead)."""
    reader = reader or embedding_reader(run)
    parts = list(score_blocks(run, test_grads, block_rows, reader))
    if not parts:
        blocks = stored_blocks(run, reader)
        g = next(iter(test_grads.values()))
        q = g.shape[0] if g.ndim == 2 else 1
        return OccurrenceScores(np.zeros(0, np.int64), np.zeros(0, object), np.zeros(0, np.int64),
                                np.zeros((0, q)), np.zeros((0, q)) if blocks.enabled else None)
    return concat(parts)


def concat(parts: list[OccurrenceScores]) -> OccurrenceScores:
    """Consecutive blocks as one."""
    return OccurrenceScores(np.concatenate([p.sample_ids for p in parts]),
                            np.concatenate([p.sources for p in parts]),
                            np.concatenate([p.steps for p in parts]),
                            np.concatenate([p.scores for p in parts]),
                            None if parts[0].se is None else np.concatenate([p.se for p in parts]))


def stored_dtype(run: Run) -> torch.dtype:
    """The precision the run's final embeddings were stored in: its embed.dtype."""
    embed = (run.manifest.get("config") or {}).get("embed") or {}
    return torch.float64 if embed.get("dtype") == "float64" else torch.float32


def stored_blocks(run: Run, reader: GradientReader) -> ProjectionBlocks:
    """The projection blocks stored beside the run's final embeddings (none for runs made with
    embed.error_blocks = 1)."""
    q = int(((run.manifest.get("config") or {}).get("embed") or {}).get("error_blocks", 1))
    if run.manifest.get("joint_layers"):  # stored as the recursion ran: the recorded layers side by side
        return ProjectionBlocks.for_run(run.manifest, q)
    layers = {n: p for n, p in reader.layers.items() if not is_block(n)}
    blocks = ProjectionBlocks.for_run({**run.manifest, "layer_dims": layers}, q)
    return blocks
