"""Fenced writers: a zombie writer (a restarted rank's predecessor, still running) never
replaces what its successor wrote, and duplicates are resolved by writer epoch, not by clock."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rayattr.record import Recorder
from rayattr.store import GradientReader, GradientWriter, Run
from rayattr.store import epochs, records
from rayattr.store.commits import ShardCommit, latest_per_step
from rayattr.store.errors import StoreError
from rayattr.store.registrations import current, open_writers
from rayattr.model.loss import micro_batch_loss
from tests.test_recorder import LR, B, setup  # noqa: F401  (the fixture)

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
    reg = current(run._storage, "train")[0]
    assert (reg["writer"], reg["status"]) == (successor._id, "open")
    _write(successor, [4, 5], 3.0)
    successor.close()
    assert _values(run) == {0: 1.0, 1: 1.0, 2: 2.0, 3: 2.0, 4: 3.0, 5: 3.0}
    # a third writer resumes after the successor's steps, not the zombie's
    with GradientWriter(run, 0, L, steps_per_shard=2) as third:
        assert third.last_committed_step == 5
        assert third.epoch > successor.epoch


def _open(run):
    return [(w["rank"], w["writer"]) for w in open_writers(run, ["train"])]


def test_a_zombie_writers_late_registration_does_not_decide_its_rank(run, monkeypatch):
    # A writer checked whether it was superseded and then wrote its rank's one registration: a
    # zombie whose check ran before its successor claimed wrote after it anyway. Every
    # interleaving below makes that check pass, as it could.
    monkeypatch.setattr(epochs, "superseded", lambda *a, **k: False, raising=False)
    zombie = GradientWriter(run, 0, L, steps_per_shard=2)
    _write(zombie, [0, 1], 1.0)
    successor = GradientWriter(run, 0, L, steps_per_shard=2, takeover=True)
    _write(successor, [2, 3], 2.0)
    zombie.close()  # "closed" lands after its successor registered "open"
    assert _open(run) == [(0, successor._id)]
    assert [w["writer"] for w in GradientReader(run).open_writers()] == [successor._id]
    with pytest.raises(StoreError, match=f"already has an open writer {successor._id}"):
        GradientWriter(run, 0, L)
    successor.close()
    assert _open(run) == []
    zombie._register("open")  # a zombie's late "open" (its start) after its successor closed
    assert _open(run) == [] and GradientReader(run).open_writers() == []
    # a writer that claimed its epoch but has not registered yet is open already: a zombie's
    # "closed" in between does not end the rank
    epochs.claim(run._storage, "train", 0, 4, "starting")
    zombie._register("closed")
    assert _open(run) == [(0, "starting")]


def test_duplicate_steps_go_to_the_later_epoch_not_the_later_clock():
    def entry(epoch, at):
        return ShardCommit(shard=f"s{epoch}", kind="train", rank=0, step_first=0, step_last=0,
                           rows=1, bytes=1, sha256="", committed_at=at, epoch=epoch)
    old_late, new_early = entry(1, at=2000.0), entry(2, at=1000.0)
    assert latest_per_step([old_late, new_early])[0][0] is new_early
    assert latest_per_step([new_early, old_late])[0][0] is new_early


def _record(rec, model, opt, data, steps, first_sample):
    """Train and record `steps`, B samples each, from sample `first_sample` on."""
    for i, step in enumerate(steps):
        b = data.batch(np.arange(first_sample + i * B, first_sample + (i + 1) * B))
        with rec.step(b["ids"].tolist(), step=step):
            micro_batch_loss(model, b["input_ids"], b["attention_mask"], b["labels"]).backward()
            opt.step()
            opt.zero_grad()
    rec.flush()


def test_a_zombie_recorders_late_step_records_do_not_replace_its_successors(setup, monkeypatch):  # noqa: F811
    cfg, run, data, model = setup  # steps_per_shard 2: records are committed two steps a chunk
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    zombie = Recorder(model, run, cfg, optimizer=opt)
    _record(zombie, model, opt, data, [0, 1], first_sample=0)
    # rank 0 restarts while its predecessor still runs: the successor goes on after step 1
    successor = Recorder(model, run, cfg, optimizer=opt, takeover=True)
    assert successor.stored_through["records"] == 1
    assert successor.records_writer.epoch > zombie.records_writer.epoch
    _record(successor, model, opt, data, [2, 3], first_sample=8)
    want = {r.step: r.sample_ids for r in run.step_records()}
    assert want[2] == data.batch(np.arange(8, 12))["ids"].tolist()
    # the zombie records the same steps with other samples, and steps past them, its clock later
    monkeypatch.setattr(records, "time", SimpleNamespace(time=lambda: 4e9))
    _record(zombie, model, opt, data, [2, 3, 4, 5], first_sample=16)
    monkeypatch.undo()
    assert {r.step: r.sample_ids for r in run.step_records()} == want
    assert [s.step for s in run.step_losses()] == [0, 1, 2, 3]
    assert run.last_step_record() == 3  # what a resumed recorder and finish's num_steps go by
    _record(successor, model, opt, data, [4, 5], first_sample=0)
    successor.finish(weights=False)
    got = {r.step: r.sample_ids for r in Run.open_uri(run.uri).step_records()}
    assert got == {**want, 4: data.batch(np.arange(0, 4))["ids"].tolist(),
                   5: data.batch(np.arange(4, 8))["ids"].tolist()}
    assert run.reload_manifest()["num_steps"] == 6
