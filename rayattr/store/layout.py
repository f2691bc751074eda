"""Object names inside a run directory (the single place that knows the layout).

<root>/<run_id>/
    run.json                                   manifest
    steps/00000000-00000063.e00000001.parquet  step records chunk of the records' writer epoch 1
    commits/steps/00000000-00000063.e00000001.json its commit entry
    grads/<kind>/r0003/00000016-00000031.e00000002.arrow  gradient shard (Arrow IPC file) of
                                               the rank's writer epoch 2
    commits/<kind>/r0003/00000016-00000031.e00000002.json its commit entry
    writers/<kind>/r0003.e00000002.json        registration (open / closed) of writer epoch 2 of rank 3
    epochs/<kind>/r0003/e00000002              the claim of writer epoch 2 of rank 3 (store/epochs.py)
    epochs/steps/r0000/e00000001               the claim of the step records' writer epoch 1
    embeddings/..., values/...                 later stages (free-form, via Run.write_*)

Directory names never repeat a data column in Hive style (`rank=3/`), so pyarrow.dataset can
read grads/<kind>/ directly.
"""

from __future__ import annotations

import re

RUN_JSON = "run.json"
STEP_DIGITS = 8
SHARD_SUFFIX = ".arrow"
RECORDS_KIND = "steps"
RECORDS_RANK = -1  # the rank a step records' commit entry names
# The records' one writer is rank 0's Recorder: it claims its epochs as rank 0's of kind "steps"
RECORDS_WRITER_RANK = 0
UPDATE_KIND = "update"  # AdamW update rows u = P g, beside the "train" rows (docs/method.md §7)

_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_run_id(run_id: str) -> str:
    from .errors import StoreError
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise StoreError(f"invalid run id {run_id!r}: use letters, digits, '.', '_' or '-' "
                         "(max 128, not starting with '.')")
    return run_id


def check_kind(kind: str) -> str:
    from .errors import StoreError
    if not isinstance(kind, str) or not _KIND_RE.match(kind) or kind == RECORDS_KIND:
        raise StoreError(f"invalid gradient kind {kind!r}: expected a lowercase name such as "
                         f"'train' or 'curvature' (not '{RECORDS_KIND}')")
    return kind


def step_range(first: int, last: int) -> str:
    return f"{first:0{STEP_DIGITS}d}-{last:0{STEP_DIGITS}d}"


def rank_dir(rank: int) -> str:
    return f"r{rank:04d}"


def _epoch_suffix(epoch: int) -> str:
    # epoch 0: a writer from before writer epochs (its objects carry no epoch in their names)
    return f".e{epoch:0{STEP_DIGITS}d}" if epoch else ""


def shard_path(kind: str, rank: int, first: int, last: int, epoch: int = 0) -> str:
    """A shard's object name: its writer's epoch is part of it, so a zombie writer (a restarted
    rank's predecessor) never overwrites its successor's objects."""
    return f"grads/{kind}/{rank_dir(rank)}/{step_range(first, last)}{_epoch_suffix(epoch)}{SHARD_SUFFIX}"


def shard_dir(kind: str, rank: int) -> str:
    return f"grads/{kind}/{rank_dir(rank)}"


def commit_dir(kind: str, rank: int | None = None) -> str:
    return f"commits/{kind}" if rank is None else f"commits/{kind}/{rank_dir(rank)}"


def commit_path(kind: str, rank: int, first: int, last: int, epoch: int = 0) -> str:
    return f"{commit_dir(kind, rank)}/{step_range(first, last)}{_epoch_suffix(epoch)}.json"


def writer_dir(kind: str) -> str:
    return f"writers/{kind}"


def writer_path(kind: str, rank: int, epoch: int = 0) -> str:
    """A writer's registration: one per writer epoch, so a zombie writer's late registration
    lands on its own key and never overwrites its successor's (store/registrations.py)."""
    return f"{writer_dir(kind)}/{rank_dir(rank)}{_epoch_suffix(epoch)}.json"


def epoch_dir(kind: str, rank: int | None = None) -> str:
    base = f"epochs/{kind}"
    return base if rank is None else f"{base}/{rank_dir(rank)}"


def epoch_path(kind: str, rank: int, epoch: int) -> str:
    """The claim of one writer epoch."""
    return f"{epoch_dir(kind, rank)}/e{epoch:0{STEP_DIGITS}d}"


def records_path(first: int, last: int, epoch: int = 0) -> str:
    return f"steps/{step_range(first, last)}{_epoch_suffix(epoch)}.parquet"


def records_commit_path(first: int, last: int, epoch: int = 0) -> str:
    return f"commits/{RECORDS_KIND}/{step_range(first, last)}{_epoch_suffix(epoch)}.json"
