"""Every step of a segment is complete before it is embedded: its record's rows from every
rank, in every kind the run records, or the segment fails naming the step, the rank, the kind
and the writer still open (docs/store.md; rayattr/embed/inputs.py)."""

from __future__ import annotations

import pytest
import torch

from rayattr.embed.segment import SegmentSpec, SegmentWorker
from rayattr.store.layout import segment_k_path
from rayattr.errors import IncompleteInputError, RayattrError
from rayattr.store import GradientWriter, Run, StepRecord, StoreError

DIMS = {"a": 3, "b": 4}
STEPS, PER_RANK = 12, 2


def rows(gen, n):
    return {name: 0.3 * torch.randn(n, p, generator=gen) for name, p in DIMS.items()}


def make_run(root, leave_open_after: int | None = None, curvature: bool = False):
    """Two ranks, PER_RANK samples each per step; rank 1's writers stay open after step
    `leave_open_after` (committed through it) when given."""
    run = Run.create(str(root), "r", {"layer_dims": DIMS})
    gen = torch.Generator().manual_seed(0)
    kinds = ["train"] + (["curvature"] if curvature else [])
    writers = {(k, r): GradientWriter(run, r, DIMS, kind=k, steps_per_shard=4) for k in kinds for r in (0, 1)}
    records = []
    for t in range(STEPS):
        ids = list(range(t * 2 * PER_RANK, (t + 1) * 2 * PER_RANK))
        ranks = [0] * PER_RANK + [1] * PER_RANK
        src = [f"s{i % 2}" for i in ids]
        for r in (0, 1):
            if r == 1 and leave_open_after is not None and t > leave_open_after:
                continue
            mine = slice(r * PER_RANK, (r + 1) * PER_RANK)
            writers["train", r].write_step(t, ids[mine], src[mine], rows(gen, PER_RANK),
                                           positions=list(range(r * PER_RANK, (r + 1) * PER_RANK)))
            if curvature:
                writers["curvature", r].write_step(t, [-1] * 3, [""] * 3, rows(gen, 3))
        records.append(StepRecord(t, 0, 0.1, 0.1 / (2 * PER_RANK), ids, src, ranks))
    for (k, r), w in writers.items():
        if r == 1 and leave_open_after is not None:
            w.flush()  # committed through leave_open_after, registration still "open"
        else:
            w.close()
    run.write_step_records(records)
    return run, writers


def worker(run, curvature=False):
    return SegmentWorker(run.uri, None, SegmentSpec(0, 0, STEPS), [0, STEPS], curvature=curvature,
                         dtype="float64")


def drop(run, kind, rank, first, last, commit=True):
    """Delete one rank's shard of steps first..last (and its commit entry)."""
    name = f"{first:08d}-{last:08d}."  # then the writer's epoch (store/epochs.py)
    tops = ["grads"] + (["commits"] if commit else [])
    gone = [r for top in tops for r in run._storage.find(f"{top}/{kind}/r{rank:04d}")
            if r.rsplit("/", 1)[1].startswith(name)]
    assert len(gone) == len(tops)
    run._storage.remove(gone)


def test_a_complete_run_embeds(tmp_path):
    run, _ = make_run(tmp_path, curvature=True)
    worker(run, curvature=True).compute()
    assert run.exists(segment_k_path(0))


def test_an_open_writer_fails_the_segment_naming_step_rank_and_writer(tmp_path):
    run, writers = make_run(tmp_path, leave_open_after=7)
    with pytest.raises(IncompleteInputError) as err:
        worker(run).compute()
    msg = str(err.value)
    assert "step 8 " in msg and "rank 1" in msg and "'train'" in msg and writers["train", 1]._id in msg, msg
    assert "still open" in msg and not run.exists(segment_k_path(0))
    for w in writers.values():
        w.close()


def test_a_deleted_shard_and_commit_fails_naming_the_step_and_rank(tmp_path):
    run, _ = make_run(tmp_path)
    drop(run, "train", 1, 4, 7)  # the rank closed cleanly: its steps 4-7 are visible, short
    with pytest.raises(IncompleteInputError, match=r"step 4 .*rank 1 has 0 rows, its record 2"):
        worker(run).compute()
    assert not run.exists(segment_k_path(0))


def test_a_deleted_shard_object_names_the_steps(tmp_path):
    run, _ = make_run(tmp_path)
    drop(run, "train", 0, 8, 11, commit=False)  # the commit entry stays: the object is gone
    with pytest.raises(StoreError, match=r"steps 8-11 of rank 0 \(train\)"):
        worker(run).compute()


def test_a_deleted_curvature_shard_fails_instead_of_the_empirical_fisher(tmp_path):
    run, _ = make_run(tmp_path, curvature=True)
    drop(run, "curvature", 0, 0, 3)
    with pytest.raises(IncompleteInputError, match=r"step 0 .*'curvature'.*rank 0 committed no rows"):
        worker(run, curvature=True).compute()
    drop(run, "curvature", 1, 0, 3)  # no rank has curvature rows there: still refused
    with pytest.raises(IncompleteInputError, match=r"step 0 .*'curvature'"):
        worker(run, curvature=True).compute()


def test_an_unrecorded_row_fails(tmp_path):
    run, _ = make_run(tmp_path)
    with GradientWriter(run, 2, DIMS, step_range=(5, 6)) as w:  # a rank the record never mentions
        w.write_step(5, [999], ["s0"], rows(torch.Generator().manual_seed(1), 1))
    with pytest.raises(IncompleteInputError, match=r"step 5 .*rank 2 has 1 rows, its record 0"):
        worker(run).compute()


def test_missing_local_embeddings_fail_finalize(tmp_path):
    run, _ = make_run(tmp_path)
    w = worker(run)
    w.compute()
    local = sorted(run._storage.find("commits/local"))
    run._storage.remove(local[:1])
    vectors = w.value_vectors({n: torch.ones(p) for n, p in DIMS.items()})
    with pytest.raises(IncompleteInputError, match=r"'local' rows"):
        w.finalize(vectors, None, embeddings=False)


def test_incomplete_input_is_a_user_error():
    assert issubclass(IncompleteInputError, RayattrError)
