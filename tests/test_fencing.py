"""Fenced writers: a zombie writer (a restarted rank's predecessor, still running) never
replaces what its successor wrote, and duplicates are resolved by writer epoch, not by clock."""

from __future__ import annotations

import json

import pytest
import torch

from rayattr.store import GradientReader, GradientWriter, Run
from rayattr.store import layout
from rayattr.store.commits import ShardCommit, latest_per_step

L = {"l": 4}


def _write(w, steps, value):
    for s in steps:
        w.write_step(s, [s], ["src"], {"l": torch.full((1, 4), float(value))})
    w.flush()


def _values(run):
    return {b.step: float(b.grads["l"][0, 0]) for b in GradientReader(run).read_steps(0, None)}


@pytest.fixture
def run(store_root):  # [local] in the fast tier, [s3] in the slow one
    return Run.create(store_root.uri, "r", {"layers": L}, options=store_root.options)


def test_zombie_writers_late_write_does_not_replace_its_successors(run):
    zombie = GradientWriter(run, 0, L, steps_per_shard=2)
    _write(zombie, [0, 1], 1.0)
    # the rank restarts while its predecessor still runs: the successor takes over
    successor = GradientWriter(run, 0, L, steps_per_shard=2, takeover=True)
    assert successor.last_committed_step == 1
    assert successor.epoch > zombie.epoch
    _write(successor, [2, 3], 2.0)
    # the zombie writes the same steps later (a later wall clock) and steps past them
    _write(zombie, [2, 3, 4, 5], 9.0)
    assert _values(run) == {0: 1.0, 1: 1.0, 2: 2.0, 3: 2.0}
    zombie.close()  # its "closed" must not mark the successor's rank finished
    reg = json.loads(run._storage.get_bytes(layout.writer_path("train", 0)))
    assert (reg["writer"], reg["status"]) == (successor._id, "open")
    _write(successor, [4, 5], 3.0)
    successor.close()
    assert _values(run) == {0: 1.0, 1: 1.0, 2: 2.0, 3: 2.0, 4: 3.0, 5: 3.0}
    # a third writer resumes after the successor's steps, not the zombie's
    with GradientWriter(run, 0, L, steps_per_shard=2) as third:
        assert third.last_committed_step == 5
        assert third.epoch > successor.epoch


def test_duplicate_steps_go_to_the_later_epoch_not_the_later_clock():
    def entry(epoch, at):
        return ShardCommit(shard=f"s{epoch}", kind="train", rank=0, step_first=0, step_last=0,
                           rows=1, bytes=1, sha256="", committed_at=at, epoch=epoch)
    old_late, new_early = entry(1, at=2000.0), entry(2, at=1000.0)
    assert latest_per_step([old_late, new_early])[0][0] is new_early
    assert latest_per_step([new_early, old_late])[0][0] is new_early
