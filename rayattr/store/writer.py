"""GradientWriter: one per training rank; buffers steps into shards and commits them in the
background (data object first, then its commit entry)."""

from __future__ import annotations

import json
import os
import posixpath
import socket
import time
import uuid
from functools import partial
from typing import Sequence

import torch

from . import epochs, layout
from .commits import ShardCommit, write_commit
from .index import load_entries
from .errors import StoreError
from .registrations import current
from .run import Run
from .shard import META_COLUMNS, check_dtype, encode_shard, sha256_hex, shard_schema, step_batch
from .uploader import BackgroundUploader

_OPEN: set[str] = set()  # ids of the writers this process has open


def _holder_alive(reg: dict) -> bool:
    """Whether the writer a registration names may still be running. Only a process on this
    machine can be seen to be gone; one elsewhere (or an old registration) counts as alive."""
    if reg.get("host") != socket.gethostname() or not isinstance(reg.get("pid"), int):
        return True
    if reg["pid"] == os.getpid():
        return reg.get("writer") in _OPEN
    try:
        os.kill(reg["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def check_layers(layers: dict[str, int]) -> dict[str, int]:
    if not isinstance(layers, dict) or not layers:
        raise StoreError("layers must be a non-empty dict {layer name: projected dim}")
    out = {}
    for name, p in layers.items():
        if not isinstance(name, str) or not name:
            raise StoreError(f"layer names must be non-empty strings, got {name!r}")
        if name in META_COLUMNS:
            raise StoreError(f"layer name '{name}' is reserved for a shard column")
        if int(p) < 1:
            raise StoreError(f"layer '{name}' has invalid dim {p}")
        out[name] = int(p)
    return out


MAX_BUFFER_BYTES = 64 << 20  # bytes of rows a writer buffers before it hands a shard to its thread
QUEUE_DEPTH = 2  # shards queued for the writer thread at most


class GradientWriter:
    """Streams one rank's per-sample gradients of one kind into committed shards.

    write_step() only validates and copies the tensors to host memory; encoding, upload and
    commit happen on a background thread behind a queue of `queue_depth` shards (a full queue
    blocks write_step: back-pressure). A restarted rank resumes after last_committed_step;
    uncommitted leftovers of an earlier writer for the same rank are removed.

    One writer per (run, kind, rank): a second one is refused while the first is open and may
    be alive (it would remove the first's uncommitted shards). `takeover=True` is for a caller
    that knows the earlier writer is dead, e.g. a restarted rank whose gang was killed.
    """

    def __init__(self, run: Run, rank: int, layers: dict[str, int], dtype: str = "float32",
                 steps_per_shard: int = 16, max_buffer_bytes: int = MAX_BUFFER_BYTES,
                 queue_depth: int = QUEUE_DEPTH, kind: str = "train", projection: dict | None = None,
                 compression: str | None = None, step_range: tuple[int, int] | None = None,
                 takeover: bool = False):
        run._check_writable("GradientWriter")
        if not isinstance(rank, int) or rank < 0:
            raise StoreError(f"rank must be a non-negative int, got {rank!r}")
        if steps_per_shard < 1 or max_buffer_bytes < 1:
            raise StoreError("steps_per_shard and max_buffer_bytes must be positive")
        if compression not in (None, "lz4", "zstd"):
            raise StoreError(f"compression must be None, 'lz4' or 'zstd', got {compression!r}")
        self.run = run
        self.rank = rank
        self.kind = layout.check_kind(kind)
        self.layers = check_layers(layers)
        self.dtype = check_dtype(dtype)
        self.steps_per_shard = steps_per_shard
        self.max_buffer_bytes = max_buffer_bytes
        self.compression = compression
        # Steps [start, end) this writer may write (e.g. one segment). Readers then wait for
        # this rank only inside that range; None = every step (data-parallel ranks).
        if step_range is not None:
            a, b = (int(x) for x in step_range)
            if not 0 <= a < b:
                raise StoreError(f"step_range must be (start, end) with 0 <= start < end, "
                                 f"got {step_range!r}")
            step_range = (a, b)
        self.step_range = step_range
        run.check_compatible(self.layers, projection)
        self._storage = run._storage
        self._schema = shard_schema(self.layers, self.dtype, self.kind)
        self._id = uuid.uuid4().hex[:12]

        if not takeover:
            self._refuse_if_open()
        # the rank's entries whether loose or folded into the index (else a compacted shard
        # would count as an uncommitted leftover and be removed)
        entries = load_entries(self._storage, kind, rank=rank, rank_dir=layout.rank_dir(rank))
        for e in entries:
            if e.layers != self.layers:
                raise StoreError(f"rank {rank} ({kind}) already committed shards with layers "
                                 f"{e.layers}; this writer has {self.layers}")
        self._last_committed: int | None = max((e.step_last for e in entries), default=None)
        self._last_written = self._last_committed
        self._remove_leftovers({e.shard for e in entries})
        # after the listing: what an earlier writer of this rank commits from now on starts at
        # or after `from` and is fenced off (store/epochs.py)
        first = 0 if self._last_committed is None else self._last_committed + 1
        self.epoch = epochs.claim(self._storage, self.kind, rank, first, self._id)
        self._register("open")
        _OPEN.add(self._id)

        self._batches: list = []
        self._steps: list[int] = []
        self._buffered_bytes = 0
        self._closed = False
        self._uploader = BackgroundUploader(queue_depth, name=f"rayattr-upload-{kind}-r{rank}")

    # -- resume & registration ---------------------------------------------------------------
    @property
    def last_committed_step(self) -> int | None:
        """Last step durably committed for this rank (None if none); resume after it."""
        return self._last_committed

    def _refuse_if_open(self) -> None:
        reg = current(self._storage, self.kind, self.rank).get(self.rank)
        if reg is not None and reg.get("status") == "open" and _holder_alive(reg):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(reg.get("time", 0)))
            raise StoreError(
                f"run '{self.run.run_id}': rank {self.rank} ({self.kind}) already has an open writer "
                f"{reg.get('writer')} (pid {reg.get('pid')} on {reg.get('host')}, since {since} UTC); "
                "a second writer is refused. Close the first, or pass takeover=True if it is dead")

    def _remove_leftovers(self, committed: set[str]) -> None:
        stale = [r for r in self._storage.find(layout.shard_dir(self.kind, self.rank))
                 if r not in committed]
        stale += [r for r in self._storage.find(layout.commit_dir(self.kind, self.rank))
                  if posixpath.basename(r).startswith(".")]  # crashed local temp files
        self._storage.remove(stale)

    def _register(self, status: str) -> None:
        # under this writer's own epoch: if a later writer of the rank took over, its
        # registration decides the rank whenever this one is written (store/registrations.py)
        info = {"rank": self.rank, "kind": self.kind, "status": status, "writer": self._id,
                "epoch": self.epoch,
                "host": socket.gethostname(), "pid": os.getpid(),
                "layers": self.layers, "dtype": self.dtype, "time": time.time(),
                "step_range": list(self.step_range) if self.step_range else None,
                "last_committed_step": self._last_committed}
        self._storage.put_bytes(layout.writer_path(self.kind, self.rank, self.epoch),
                                json.dumps(info).encode())

    # -- writing -----------------------------------------------------------------------------
    def write_step(self, step: int, sample_ids: Sequence[int], sources: Sequence[str],
                   grads: dict[str, torch.Tensor], positions: Sequence[int] | None = None) -> None:
        """Buffer one step's rows. positions[i] = index of row i in the step's global batch."""
        if self._closed:
            raise StoreError("write_step on a closed GradientWriter")
        self._uploader.raise_if_failed()
        step = self._check_step(step)
        n = len(sample_ids)
        if len(sources) != n:
            raise StoreError(f"step {step}: {n} sample_ids but {len(sources)} sources")
        if positions is None:
            positions = [-1] * n
        elif len(positions) != n:
            raise StoreError(f"step {step}: {n} sample_ids but {len(positions)} positions")
        self._check_grads(step, grads, n)

        if self._steps and step // self.steps_per_shard != self._steps[0] // self.steps_per_shard:
            self._submit_shard()  # keep shards aligned to step chunks across ranks
        batch = step_batch(self._schema, step, self.rank, sample_ids, sources, positions, grads,
                           self.dtype)
        self._batches.append(batch)
        self._steps.append(step)
        self._buffered_bytes += batch.nbytes
        self._last_written = step
        if (step + 1) % self.steps_per_shard == 0 or self._buffered_bytes >= self.max_buffer_bytes:
            self._submit_shard()

    def _check_step(self, step) -> int:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise StoreError(f"step must be a non-negative int, got {step!r}")
        if self._last_committed is not None and step <= self._last_committed:
            raise StoreError(f"step {step} is already committed for rank {self.rank} "
                             f"({self.kind}); resume after step {self._last_committed}")
        if self._last_written is not None and step <= self._last_written:
            raise StoreError(f"steps must increase: got {step} after {self._last_written}")
        if self.step_range and not self.step_range[0] <= step < self.step_range[1]:
            raise StoreError(f"step {step} is outside this writer's step_range "
                             f"{list(self.step_range)}")
        return step

    def _check_grads(self, step: int, grads: dict, n: int) -> None:
        for name in grads:
            if name not in self.layers:
                raise StoreError(f"step {step}: unknown layer '{name}' (writer layers: "
                                 f"{sorted(self.layers)})")
        for name, p in self.layers.items():
            if name not in grads:
                raise StoreError(f"step {step}: gradient for layer '{name}' is missing")
            g = grads[name]
            if not isinstance(g, torch.Tensor):
                raise StoreError(f"step {step}: layer '{name}' must be a torch.Tensor")
            if tuple(g.shape) != (n, p):
                raise StoreError(f"step {step}: layer '{name}' has shape {tuple(g.shape)}, "
                                 f"expected ({n}, {p})")

    def _submit_shard(self) -> None:
        if not self._steps:
            return
        job = partial(self._upload, self._batches, self._steps)
        self._batches, self._steps, self._buffered_bytes = [], [], 0
        self._uploader.submit(job)

    def _upload(self, batches: list, steps: list[int]) -> None:
        """Background thread: encode, PUT the shard, then PUT its commit entry."""
        buf, header, footer, parts = encode_shard(self._schema, batches, steps, self.compression)
        first, last = steps[0], steps[-1]
        rel = layout.shard_path(self.kind, self.rank, first, last, self.epoch)
        self._storage.put_bytes(rel, buf)
        entry = ShardCommit(shard=rel, kind=self.kind, rank=self.rank, step_first=first,
                            step_last=last, rows=sum(p.rows for p in parts), bytes=buf.size,
                            sha256=sha256_hex(buf), committed_at=time.time(), writer=self._id,
                            epoch=self.epoch, dtype=self.dtype, layers=self.layers, header=header, footer=footer,
                            steps=parts)
        write_commit(self._storage, layout.commit_path(self.kind, self.rank, first, last, self.epoch),
                     entry)
        self._last_committed = last

    # -- lifecycle -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Commit everything written so far (ends the current shard early) and wait for it."""
        self._submit_shard()
        self._uploader.drain()

    def close(self, _mark_closed: bool = True) -> None:
        """Commit the last partial shard, stop the upload thread, mark this rank finished."""
        if self._closed:
            return
        try:
            self._submit_shard()
        finally:
            self._closed = True
            _OPEN.discard(self._id)
            self._uploader.close()  # drains, re-raises an upload failure, stops the thread
        if _mark_closed:
            self._register("closed")

    def __enter__(self) -> "GradientWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an exception the rank did not finish: commit what is complete, but stay "open"
        # so readers keep waiting for this rank instead of skipping its later steps.
        self.close(_mark_closed=exc_type is None)

    def __repr__(self) -> str:
        return (f"GradientWriter({self.run.uri!r}, rank={self.rank}, kind={self.kind!r}, "
                f"dtype={self.dtype!r}, last_committed_step={self._last_committed})")
