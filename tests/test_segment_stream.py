"""Segment actors stream their step range: local embeddings written chunk by chunk as the
backward sweep passes (memory K plus one chunk), equal to the whole-segment result bit for
bit, and a sweep killed midway resumes without rewriting or losing a committed chunk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayattr.runtime import hooks
from rayattr.embed.segment import SegmentSpec, SegmentWorker
from rayattr.store.layout import LOCAL_KIND, segment_k_path
from rayattr.embed.tensors import load_tensors
from rayattr.store import GradientReader, GradientWriter, Run, StepRecord

DIMS = {"a": 3, "b": 4}
STEPS, BATCH = 23, 3


def make_run(root) -> Run:
    run = Run.create(str(root), "r", {"layer_dims": DIMS})
    gen = torch.Generator().manual_seed(0)
    records = []
    with GradientWriter(run, 0, DIMS, steps_per_shard=5) as w:
        for t in range(STEPS):
            ids = list(range(t * BATCH, (t + 1) * BATCH))
            src = [f"s{i % 2}" for i in ids]
            w.write_step(t, ids, src, {n: 0.3 * torch.randn(BATCH, p, generator=gen) for n, p in DIMS.items()},
                         positions=list(range(BATCH)))
            records.append(StepRecord(t, t // 10, 0.1, 0.1 / BATCH, ids, src, [0] * BATCH))
    run.write_step_records(records)
    return run


def worker(run, **kw):
    return SegmentWorker(run.uri, None, SegmentSpec(0, 2, STEPS), [0, 10, STEPS], dtype="float64", **kw)


def local_rows(run):
    return {b.step: (b.sample_ids.tolist(), b.grads) for b in
            GradientReader(run, kind=LOCAL_KIND).read_steps(0, None, dtype=torch.float64)}


@pytest.fixture(autouse=True)
def no_hooks():
    hooks.clear()
    yield
    hooks.clear()


def test_chunked_sweep_equals_the_whole_segment(tmp_path):
    whole, chunked = make_run(tmp_path / "w"), make_run(tmp_path / "c")
    worker(whole, write_chunk=1000).compute()
    worker(chunked, write_chunk=4, read_chunk=3).compute()
    a, b = local_rows(whole), local_rows(chunked)
    assert sorted(a) == sorted(b) == list(range(2, STEPS))
    for t in a:
        assert a[t][0] == b[t][0]
        for n in DIMS:  # stored as float32 either way; the same float64 sweep computed them
            assert torch.equal(a[t][1][n], b[t][1][n])
    ka = load_tensors(whole.read_bytes(segment_k_path(0)))
    kb = load_tensors(chunked.read_bytes(segment_k_path(0)))
    assert all(torch.equal(ka[n], kb[n]) for n in DIMS)
    writers = chunked._storage.find("writers/local")
    assert len(writers) == 6  # 21 steps in chunks of 4 aligned on the end: 5 of 4 and 1 of 1


def test_a_sweep_killed_midway_resumes(tmp_path):
    want_run, run = make_run(tmp_path / "w"), make_run(tmp_path / "k")
    worker(want_run, write_chunk=4).compute()

    def die(segment, step):
        if step == 11:  # 11 steps swept from the end: two chunks of 4 written, the third not
            raise RuntimeError("killed")

    hooks.register("segment.compute", die)
    with pytest.raises(RuntimeError, match="killed"):
        worker(run, write_chunk=4).compute()
    hooks.clear()
    partial = local_rows(run)
    assert sorted(partial) == list(range(STEPS - 8, STEPS)) and not run.exists(segment_k_path(0))
    committed = {r: run._storage.get_bytes(r) for r in run._storage.find("grads/local")}
    worker(run, write_chunk=4).compute()  # the restarted actor
    assert all(run._storage.get_bytes(r) == data for r, data in committed.items())  # not rewritten
    got, want = local_rows(run), local_rows(want_run)
    assert sorted(got) == sorted(want)
    for t in want:
        assert all(torch.equal(got[t][1][n], want[t][1][n]) for n in DIMS)
    assert np.isfinite(load_tensors(run.read_bytes(segment_k_path(0)))["a"].numpy()).all()
