"""Step records: what each training step did (step size, global batch in order).

Written as Parquet chunks under steps/ and committed like gradient shards (a commit entry
under commits/steps/ written after the chunk); readers see committed chunks only. Their
writer (rank 0's Recorder) is fenced like a gradient writer (store/epochs.py): it claims an
epoch of the records once, its chunks and entries carry it in their names, and of two
records of one step the later epoch's wins, never the later clock.
"""

from __future__ import annotations

import io
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from . import epochs, layout
from .commits import RECORDS_FORMAT, ShardCommit, sha256_hex, write_commit
from .index import last_step, load_entries
from .errors import StoreError

if TYPE_CHECKING:
    from .run import Run

_SCHEMA = pa.schema([
    pa.field("step", pa.int64()), pa.field("epoch", pa.int64()),
    pa.field("lr", pa.float64()), pa.field("eta", pa.float64()),
    pa.field("sample_ids", pa.list_(pa.int64())), pa.field("sources", pa.list_(pa.string())),
    pa.field("ranks", pa.list_(pa.int32())), pa.field("clip", pa.float64()),
    pa.field("loss", pa.float64()),  # null when the training loop gave none
    # AdamW (docs/method.md §7); SGD runs read the defaults
    pa.field("optimizer", pa.string()), pa.field("weight_decay", pa.float64()),
    pa.field("beta1", pa.float64()), pa.field("beta2", pa.float64()), pa.field("eps", pa.float64()),
    pa.field("adam_step", pa.int64()), pa.field("precondition_step", pa.int64()),
])
_ADAM_FIELDS = ("optimizer", "weight_decay", "beta1", "beta2", "eps", "adam_step", "precondition_step")


@dataclass
class StepRecord:
    """One optimizer step as the attribution math needs it."""

    step: int  # global step index (0-based)
    epoch: int  # epoch the step belongs to
    lr: float  # learning rate the optimizer applied at this step
    eta: float  # per-sample step size eta_t = κ_t·lr_t / |B_t| (docs/method.md §2)
    sample_ids: list[int] = field(default_factory=list)  # global batch, in global-batch order
    sources: list[str] = field(default_factory=list)  # source (dataset) of each sample
    ranks: list[int] = field(default_factory=list)  # rank that processed each sample
    clip: float = 1.0  # κ_t, the global-norm clipping factor of the step (folded into eta)
    loss: float | None = None  # training loss of the step: mean over the global batch (None = not recorded)
    optimizer: str = "sgd"  # "sgd" or "adamw"
    weight_decay: float = 0.0  # λ: the weights were scaled by 1 - lr·λ at this step (AdamW)
    beta1: float = 0.0  # Adam's β₁ (momentum)
    beta2: float = 0.0  # Adam's β₂
    eps: float = 0.0  # Adam's ε
    adam_step: int | None = None  # Adam's step counter of this update (its bias correction); None for SGD
    precondition_step: int | None = None  # Adam's counter of the v the update rows used (0: none yet, u = g)

    @property
    def decay(self) -> float:
        """α_t = 1 - lr_t·λ, decoupled weight decay's factor in K_t (docs/method.md §7)."""
        return 1.0 - self.lr * self.weight_decay if self.weight_decay else 1.0

    def validate(self) -> None:
        n = len(self.sample_ids)
        if len(self.sources) != n or len(self.ranks) != n:
            raise StoreError(f"step record {self.step}: sample_ids ({n}), sources "
                             f"({len(self.sources)}) and ranks ({len(self.ranks)}) differ in length")
        if not isinstance(self.step, int) or self.step < 0:
            raise StoreError(f"step record has invalid step {self.step!r}")
        if not (math.isfinite(self.lr) and math.isfinite(self.eta)):
            raise StoreError(f"step record {self.step}: lr/eta must be finite")
        if self.loss is not None and not math.isfinite(self.loss):
            raise StoreError(f"step record {self.step}: loss must be finite or None")


class StepRecordWriter:
    """The writer of a run's step records: rank 0's Recorder has one, and so has a Run handle
    for Run.write_step_records. It claims a writer epoch of the records once, after reading
    the last committed step (as GradientWriter does for its rank), so a zombie recorder (a
    restarted rank 0's predecessor still running) can neither overwrite nor outvote its
    successor: what it commits from the successor's first step on is fenced off."""

    def __init__(self, run: "Run"):
        run._check_writable("write_step_records")
        self.run = run
        self.writer = uuid.uuid4().hex[:12]
        self.last_committed_step = last_record_step(run)
        first = 0 if self.last_committed_step is None else self.last_committed_step + 1
        self.epoch = epochs.claim(run._storage, layout.RECORDS_KIND, layout.RECORDS_WRITER_RANK, first,
                                  self.writer)
        self._seq = 0  # commits so far: a step this writer records twice goes to its later commit

    def write(self, records: Sequence[StepRecord]) -> None:
        """Commit `records` (one chunk + one commit entry)."""
        if not records:
            return
        write_step_records(self.run, records, self.epoch, self.writer, self._seq)
        self._seq += 1


def write_step_records(run: "Run", records: Sequence[StepRecord], epoch: int, writer: str = "",
                       seq: int = 0) -> None:
    """Commit one chunk of records as commit `seq` of `writer`, of its records epoch `epoch`
    (StepRecordWriter claims it)."""
    if not records:
        return
    recs = sorted(records, key=lambda r: r.step)
    for r in recs:
        r.validate()
    steps = [r.step for r in recs]
    if len(set(steps)) != len(steps):
        raise StoreError("write_step_records: duplicate steps in one call")
    table = pa.table({
        "step": steps, "epoch": [int(r.epoch) for r in recs], "lr": [float(r.lr) for r in recs],
        "eta": [float(r.eta) for r in recs], "sample_ids": [list(map(int, r.sample_ids)) for r in recs],
        "sources": [list(map(str, r.sources)) for r in recs],
        "ranks": [list(map(int, r.ranks)) for r in recs], "clip": [float(r.clip) for r in recs],
        "loss": [None if r.loss is None else float(r.loss) for r in recs],
        **{k: [getattr(r, k) for r in recs] for k in _ADAM_FIELDS}}, schema=_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue()
    first, last = steps[0], steps[-1]
    rel = layout.records_path(first, last, epoch)
    run._storage.put_bytes(rel, data)
    entry = ShardCommit(shard=rel, kind=layout.RECORDS_KIND, rank=layout.RECORDS_RANK, step_first=first,
                        step_last=last, rows=len(recs), bytes=len(data), sha256=sha256_hex(data),
                        committed_at=time.time(), writer=writer, epoch=epoch, seq=seq,
                        format=RECORDS_FORMAT)
    write_commit(run._storage, layout.records_commit_path(first, last, epoch), entry)


def _in_commit_order(entries: list[ShardCommit]) -> list[ShardCommit]:
    """Entries in the order a re-written step's records replace each other: by writer epoch,
    then by commit within one writer, then by name; never by the clock, so every reader agrees."""
    return sorted(entries, key=lambda e: (e.epoch, e.seq, e.shard))


def read_step_records(run: "Run", step_start: int = 0, step_end: int | None = None) -> list[StepRecord]:
    """Committed records of steps [step_start, step_end) (end None: all): only the chunks
    whose step range overlaps it are fetched, found through the index (store/index.py)."""
    entries = _in_commit_order(load_entries(run._storage, layout.RECORDS_KIND, step_start=step_start,
                                            step_end=step_end))
    blobs = run._storage.get_many([e.shard for e in entries])
    by_step: dict[int, StepRecord] = {}
    for e, data in zip(entries, blobs):  # a re-written step: the later writer (commit) wins
        if run._storage.options.verify_checksums and sha256_hex(data) != e.sha256:
            raise StoreError(f"checksum mismatch in step records {run.uri}/{e.shard}")
        for row in pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False).to_pylist():  # see Run.read_table
            if row["step"] < step_start or (step_end is not None and row["step"] >= step_end):
                continue
            # a field this run's optimizer does not record (SGD's Adam fields) is null: its default stands
            by_step[row["step"]] = StepRecord(**{k: v for k, v in row.items() if v is not None or k == "loss"})
    return [by_step[s] for s in sorted(by_step)]


@dataclass(frozen=True)
class StepLoss:
    """A step record's step, loss, learning rate and clip factor alone (what `rayattr show`
    and `report` plot and summarise, and what the driver counts clipped steps from)."""

    step: int
    loss: float | None
    lr: float
    clip: float = 1.0


def read_step_losses(run: "Run") -> list[StepLoss]:
    """Every committed step's loss, learning rate and clip factor, reading only those columns
    of each chunk (range reads of four column chunks, not the per-sample lists); a re-written
    step goes to the later writer (commit), as in read_step_records."""
    entries = _in_commit_order(load_entries(run._storage, layout.RECORDS_KIND))
    by_step: dict[int, tuple[float | None, float, float]] = {}
    for e in entries:
        with run._storage.open_read(e.shard) as f:
            t = pq.ParquetFile(f).read(columns=["step", "loss", "lr", "clip"], use_threads=False)
        by_step.update(zip(t["step"].to_pylist(),
                           zip(t["loss"].to_pylist(), t["lr"].to_pylist(), t["clip"].to_pylist())))
    return [StepLoss(s, *by_step[s]) for s in sorted(by_step)]


def last_record_step(run: "Run") -> int | None:
    """The last committed step record's step (None: none yet), without reading any record:
    each chunk's commit entry is named by its step range, whose last step is the chunk's
    largest (store/index.py, last_step), so this is max(r.step for r in step_records())
    (after a recorder was succeeded, the entries are read: a zombie's later ones do not count)."""
    return last_step(run._storage, layout.RECORDS_KIND)
