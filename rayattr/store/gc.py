"""Deleting a finished run's intermediates: what answers need stays, the bulk goes.

Kept: run.json, data/, values/, embeddings/, weights/, embed/ (segment results), the step
records (steps/, commits/steps/) and the final per-occurrence embeddings `rayattr query` reads
(grads/embeddings with its commits and writers). Deleted: every other gradient kind (train,
curvature, local: the per-sample gradients, ~22 TB in the 7 B example), its commit entries
and writer registrations and epoch claims, and the DeepSpeed checkpoints.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from dataclasses import dataclass

from .errors import StoreError
from .run import Run

KEEP_KINDS = ("embeddings", "steps")  # read by `rayattr query` and by `rayattr show`
GC_STATUSES = ("done", "failed")  # anything else may still run, or be resumed from these files


@dataclass
class Garbage:
    """One group of objects gc deletes (e.g. grads/train)."""

    group: str
    objects: list[str]
    bytes: int


def collectable(run: Run) -> list[Garbage]:
    """The groups gc would delete from `run`, commit entries first (so that, if interrupted,
    no commit ever names a deleted shard), then writer registrations and epoch claims, shards,
    checkpoints."""
    storage = run._storage
    groups = [f"{top}/{kind}" for top in ("commits", "writers", "epochs", "grads")
              for kind in storage.list_dir(top) if kind not in KEEP_KINDS]
    out = []
    for group in groups + ["checkpoints"]:
        sizes = storage.sizes(group)
        if sizes:
            out.append(Garbage(group, sorted(sizes), sum(sizes.values())))
    return out


def check_collectable(run: Run) -> None:
    status = run.manifest.get("status", "unknown")
    if status not in GC_STATUSES:
        raise StoreError(f"run '{run.run_id}' has status '{status}': gc only deletes the intermediates "
                         f"of a run that is {' or '.join(GC_STATUSES)}; a running or interrupted run "
                         "still needs its gradients and checkpoints (to finish, or to resume)")


def collect(run: Run, garbage: list[Garbage]) -> dict:
    """Delete `garbage` (from collectable) and note it in run.json under "gc"; returns that note.
    Holds the run's driver lease: a driver still working on the run (a failed run being
    resumed) refuses it, before anything is deleted."""
    from .lease import driver_lease

    with driver_lease(run):
        return _collect(run, garbage)


def _collect(run: Run, garbage: list[Garbage]) -> dict:
    check_collectable(run)
    storage = run._storage
    for g in garbage:
        for i in range(0, len(g.objects), 1000):  # S3 deletes at most 1000 keys per request
            storage.remove(g.objects[i:i + 1000])
        if storage.local:  # leave no empty directories behind
            shutil.rmtree(storage.path(g.group), ignore_errors=True)
            parent = os.path.dirname(storage.path(g.group))
            if os.path.isdir(parent) and not os.listdir(parent):
                os.rmdir(parent)
    note = {"at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "deleted": [g.group for g in garbage], "objects": sum(len(g.objects) for g in garbage),
            "bytes": sum(g.bytes for g in garbage)}
    previous = run.manifest.get("gc") or {}
    if previous:  # a second gc adds to the first
        note["deleted"] = sorted(set(previous.get("deleted", [])) | set(note["deleted"]))
        note["objects"] += previous.get("objects", 0)
        note["bytes"] += previous.get("bytes", 0)
    run.update_manifest(gc=note)
    return note
