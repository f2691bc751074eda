"""Several writers on one store: jobs on different runs do not interfere, a second writer of
the same run (or of the same rank of a run) is refused, and a reader of a run still training
sees only committed steps. Each case runs on a local store and on SeaweedFS S3."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from rayattr.store import GradientReader, GradientWriter, Run, StepRecord, StoreError, list_runs
from rayattr.store import layout
from rayattr.store.registrations import current

LAYERS = {"l": 4}

# One "job": a run with 2 ranks x 6 steps of gradients and its step records, values depending
# on the run, so that a row landing in the other run would show.
JOB = textwrap.dedent("""
    import sys, torch
    from rayattr.store import GradientWriter, Run, StepRecord
    root, name, salt = sys.argv[1], sys.argv[2], float(sys.argv[3])
    run = Run.create(root, name, {"layers": {"l": 4}})
    writers = [GradientWriter(run, r, {"l": 4}, steps_per_shard=2) for r in range(2)]
    for step in range(6):
        for r, w in enumerate(writers):
            w.write_step(step, [10 * step + r], ["s"], {"l": torch.full((1, 4), salt + step + r / 10)},
                         positions=[r])
        if step % 2:
            run.write_step_records([StepRecord(s, 0, 0.1, 0.05, [10 * s, 10 * s + 1], ["s", "s"], [0, 1])
                                    for s in (step - 1, step)])
    for w in writers:
        w.close()
    run.update_manifest(status="done")
""")


def test_two_jobs_on_one_root_do_not_interfere(store_root):
    env = {**os.environ, **store_root.env}
    procs = [subprocess.Popen([sys.executable, "-c", JOB, store_root.uri, name, salt], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, salt in (("a", "100"), ("b", "200"))]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
    assert [(r["run_id"], r["status"]) for r in list_runs(store_root.uri, store_root.options)] == \
        [("a", "done"), ("b", "done")]
    for name, salt in (("a", 100.0), ("b", 200.0)):
        run = Run.open(store_root.uri, name, store_root.options)
        batches = GradientReader(run).read_steps(0, None)
        assert [b.step for b in batches] == list(range(6))
        for b in batches:
            assert b.sample_ids.tolist() == [10 * b.step, 10 * b.step + 1]
            expected = torch.tensor([[salt + b.step + r / 10] * 4 for r in range(2)])
            torch.testing.assert_close(b.grads["l"], expected)
        assert [r.step for r in run.step_records()] == list(range(6))


def test_second_create_of_one_run_id_is_refused(store_root):
    """Eight creators race for one run id: exactly one wins; the others get a clear error and
    the manifest is the winner's."""
    n = 8
    barrier, won, refused = threading.Barrier(n), [], []

    def create(i):
        barrier.wait()
        try:
            Run.create(store_root.uri, "same", {"creator": i}, options=store_root.options)
            won.append(i)
        except StoreError as err:
            refused.append(str(err))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(won) == 1, won  # exactly one creator wins run.json
    assert len(refused) == n - 1
    assert all("run 'same' already exists" in e and "another job" in e for e in refused), refused[0]
    assert Run.open(store_root.uri, "same", store_root.options).manifest["creator"] == won[0]


def test_second_writer_on_one_rank_is_refused(store_root):
    run = Run.create(store_root.uri, "r", {"layers": LAYERS}, options=store_root.options)
    first = GradientWriter(run, 0, LAYERS, steps_per_shard=4)
    first.write_step(0, [0], ["s"], {"l": torch.ones(1, 4)})  # buffered, not committed yet
    again = Run.open(store_root.uri, "r", store_root.options, mode="record")
    with pytest.raises(StoreError, match=r"rank 0 \(train\) already has an open writer .* second writer is refused"):
        GradientWriter(again, 0, LAYERS)  # a second writer would remove the first's uncommitted shards
    # other ranks and kinds are other writers
    GradientWriter(again, 1, LAYERS).close()
    GradientWriter(again, 0, LAYERS, kind="curvature").close()
    first.write_step(1, [1], ["s"], {"l": torch.ones(1, 4)})
    first.close()
    assert GradientReader(again).committed_steps() == [0, 1]
    # once the first is closed, a new writer goes on after its last step
    with GradientWriter(again, 0, LAYERS) as w:
        assert w.last_committed_step == 1


def test_writer_of_a_dead_process_is_taken_over(store_root):
    """A writer whose process died (on this machine) does not block its successor."""
    run = Run.create(store_root.uri, "r", {"layers": LAYERS}, options=store_root.options)
    code = textwrap.dedent("""
        import os, sys, torch
        from rayattr.store import GradientWriter, Run
        w = GradientWriter(Run.open(sys.argv[1], "r", mode="record"), 0, {"l": 4}, steps_per_shard=1)
        w.write_step(0, [0], ["s"], {"l": torch.ones(1, 4)})
        w.flush()
        os._exit(3)  # dies with its writer registered open
    """)
    out = subprocess.run([sys.executable, "-c", code, store_root.uri], env={**os.environ, **store_root.env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr[-2000:]
    assert current(run._storage, "train")[0]["status"] == "open"
    with GradientWriter(run, 0, LAYERS) as w:
        assert w.last_committed_step == 0


def test_reader_of_a_training_run_sees_only_committed_steps(store_root):
    run = Run.create(store_root.uri, "r", {"layers": LAYERS}, options=store_root.options)
    w = GradientWriter(run, 0, LAYERS, steps_per_shard=2)
    for step in range(3):  # steps 0-1 committed, step 2 buffered
        w.write_step(step, [step], ["s"], {"l": torch.full((1, 4), float(step))})
    w._uploader.drain()
    run.write_step_records([StepRecord(s, 0, 0.1, 0.1, [s], ["s"], [0]) for s in (0, 1)])
    # a crash between the two PUTs: a shard for steps 2-3 with no commit entry, and step records
    # likewise
    run._storage.put_bytes(layout.shard_path("train", 0, 2, 3, w.epoch), b"half-written")
    run._storage.put_bytes(layout.records_path(2, 3, 1), b"half-written")

    reader_run = Run.open(store_root.uri, "r", store_root.options)
    reader = GradientReader(reader_run)
    assert reader.committed_steps() == [0, 1]
    assert [b.step for b in reader.read_steps(0, None)] == [0, 1]
    assert [r.step for r in reader_run.step_records()] == [0, 1]
    w.close()
    reader.refresh()
    assert reader.committed_steps() == [0, 1, 2]
