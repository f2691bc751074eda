"""Compacted commit manifests (rayattr/store/index.py): a reader opens a few objects per kind
and step range, and sees exactly the committed entries at every point of a compaction,
including a compaction killed between its writes (local store and S3)."""

from __future__ import annotations

import pytest
import torch

from rayattr.runtime import hooks
from rayattr.store import GradientReader, GradientWriter, StepRecord
from rayattr.store.index import _loose, _manifests, compact, load_entries
from rayattr.store.storage import Storage
from tests.test_store import LAYERS, expected_step, make_step, new_run, write_rank


def write_world(run, steps, world=2, steps_per_shard=3):
    for r in range(world):
        write_rank(run, r, steps, world=world, steps_per_shard=steps_per_shard)


def snapshot(run, **kw):
    """Everything a reader returns: steps, rows and gradients."""
    reader = GradientReader(run, **kw)
    return [(b.step, b.sample_ids.tolist(), b.sources, b.positions.tolist(),
             {n: g.clone() for n, g in b.grads.items()}) for b in reader.iter_steps()]


def assert_same(a, b):
    assert [x[:4] for x in a] == [x[:4] for x in b]
    for x, y in zip(a, b):
        assert all(torch.equal(x[4][n], y[4][n]) for n in LAYERS)


class Crash(Exception):
    """A compactor killed at a seam."""


def crash_at(where: str):
    def hook(kind, chunk, at):
        if at == where:
            raise Crash(f"{kind} chunk {chunk}: {at}")
    return hook


@pytest.fixture(autouse=True)
def no_hooks():
    hooks.clear()
    yield
    hooks.clear()


def test_compaction_keeps_every_read_and_folds_all_ranks(store_root):
    run = new_run(store_root)
    write_world(run, range(20))
    before = snapshot(run)
    assert len(before) == 20
    n_loose = len(_loose(run._storage, "train"))
    assert n_loose == 2 * 7  # 7 shards per rank
    assert compact(run._storage, "train", span=8) == n_loose
    assert _loose(run._storage, "train") == []
    assert [m[1:] for m in sorted(_manifests(run._storage, "train"))] == [(0, 0, 8), (1, 9, 17), (2, 18, 19)]
    assert_same(snapshot(run), before)
    assert_same(snapshot(run, step_range=(5, 11)), [x for x in before if 5 <= x[0] < 11])
    for step, ids, *_ in before:
        assert ids == expected_step(step, 2)[0]


def test_a_step_range_opens_only_the_manifests_it_overlaps(tmp_path, monkeypatch):
    root = type("R", (), {"uri": str(tmp_path), "options": None})
    from rayattr.store import StoreOptions
    root.options = StoreOptions()
    run = new_run(root)
    write_world(run, range(40), steps_per_shard=4)
    compact(run._storage, "train", span=8)
    opened = []
    orig = Storage.get_many

    def spy(self, rels, keep_errors=False):
        opened.extend(rels)
        return orig(self, rels, keep_errors)

    monkeypatch.setattr(Storage, "get_many", spy)
    GradientReader(run, step_range=(17, 22))
    commits = [r.rsplit("/", 1)[1] for r in opened if r.startswith("commits/")]
    assert commits == ["c00000002-00000016-00000023.parquet"]
    assert len(opened) == 1 + 2  # and the two ranks' writer registrations
    opened.clear()
    GradientReader(run)
    assert len([r for r in opened if r.startswith("commits/")]) == 5  # one per manifest, not 20 shards


@pytest.mark.parametrize("where", ["manifest written", "old manifest removed"])
def test_a_compaction_killed_midway_loses_and_duplicates_nothing(store_root, where):
    run = new_run(store_root)
    write_world(run, range(10))
    compact(run._storage, "train", span=8)  # chunk 0 now has a manifest the next one replaces
    for r in range(2):  # more steps: new loose entries in chunks 1 (and 0's manifest stays)
        with GradientWriter(run, r, LAYERS, steps_per_shard=3) as w:
            assert w.last_committed_step == 9  # resumes after the compacted entries
            for s in range(10, 16):
                ids, src, pos, g = make_step(s, r, 2)
                w.write_step(s, ids, src, g, positions=pos)
    want = snapshot(run)
    assert [x[0] for x in want] == list(range(16))
    hooks.register("index.compact", crash_at(where))
    with pytest.raises(Crash):
        compact(run._storage, "train", span=8)
    assert_same(snapshot(run), want)  # the manifest and the loose entries overlap: dedup
    assert len(load_entries(run._storage, "train")) == len({(e.rank, e.shard) for e in load_entries(run._storage, "train")})
    hooks.clear()
    compact(run._storage, "train", span=8)  # the next compaction finishes the job
    assert _loose(run._storage, "train") == []
    assert_same(snapshot(run), want)


def test_replacing_a_chunk_manifest_midway_keeps_both_readable(store_root):
    """A chunk with a manifest gets new entries: the union is written before the old one goes."""
    run = new_run(store_root)
    write_rank(run, 0, range(4), steps_per_shard=2)
    compact(run._storage, "train", span=100)
    with GradientWriter(run, 0, LAYERS, steps_per_shard=2) as w:
        for s in range(4, 8):
            w.write_step(s, *make_step(s, 0)[:2], make_step(s, 0)[3], positions=make_step(s, 0)[2])
    want = snapshot(run)
    hooks.register("index.compact", crash_at("manifest written"))
    with pytest.raises(Crash):
        compact(run._storage, "train", span=100)
    assert len(_manifests(run._storage, "train")) == 2  # the old and its replacement
    assert_same(snapshot(run), want)
    hooks.clear()
    compact(run._storage, "train", span=100)
    assert [m[1:] for m in _manifests(run._storage, "train")] == [(0, 0, 7)]
    assert_same(snapshot(run), want)


def test_a_writer_after_compaction_removes_no_committed_shard(store_root):
    run = new_run(store_root)
    write_rank(run, 0, range(6), steps_per_shard=2)
    shards = set(run._storage.find("grads/train/r0000"))
    compact(run._storage, "train")
    w = GradientWriter(run, 0, LAYERS)
    assert w.last_committed_step == 5
    assert set(run._storage.find("grads/train/r0000")) == shards
    w.close()


def test_step_records_read_by_step_range_through_the_index(store_root):
    run = new_run(store_root)
    for a in range(0, 12, 4):  # three chunks of records
        run.write_step_records([StepRecord(s, 0, 0.1, 0.01 * s, [s], ["x"], [0]) for s in range(a, a + 4)])
    run.write_step_records([StepRecord(5, 0, 0.1, 9.0, [5], ["x"], [0])])  # a re-written step: latest wins
    want = run.step_records()
    assert [r.step for r in want] == list(range(12)) and want[5].eta == 9.0
    compact(run._storage, "steps", span=8)
    assert run.step_records() == want
    part = run.step_records(3, 7)
    assert part == want[3:7]
    assert len(load_entries(run._storage, "steps", step_start=8, step_end=12)) == 1


def test_last_step_record_is_the_max_over_all_records_from_names_only(store_root, monkeypatch):
    """Run.last_step_record (what a recorder resumes from and finish's num_steps) equals the
    max over every record, with loose entries, after a compaction, with loose entries beside
    manifests, and with a later re-write of an earlier step; and it reads no object."""
    run = new_run(store_root)
    rec = lambda s: StepRecord(s, 0, 0.1, 0.01 * s, [s], ["x"], [0])  # noqa: E731
    truth = lambda: max((r.step for r in run.step_records()), default=None)  # noqa: E731
    assert run.last_step_record() is None and truth() is None
    seen = []
    for chunk in ([0, 1, 2], [3, 4], [5, 6, 7, 8], [9]):
        run.write_step_records([rec(s) for s in chunk])
        seen.append((run.last_step_record(), truth()))
    compact(run._storage, "steps", span=4)  # manifests for chunks of 4 steps, no loose entries
    assert not _loose(run._storage, "steps") and _manifests(run._storage, "steps")
    seen.append((run.last_step_record(), truth()))
    run.write_step_records([rec(s) for s in (10, 11)])  # loose beside the manifests
    run.write_step_records([rec(2)])  # a re-written early step does not move the last one
    seen.append((run.last_step_record(), truth()))
    compact(run._storage, "steps", span=4)
    seen.append((run.last_step_record(), truth()))
    run.write_step_records([rec(s) for s in range(12, 20)])  # loose, spanning two chunks
    monkeypatch.setattr(Storage, "get_bytes", lambda *a, **k: pytest.fail("read an object"))
    monkeypatch.setattr(Storage, "get_many", lambda *a, **k: pytest.fail("read an object"))
    seen.append((run.last_step_record(), 19))
    assert all(a == b for a, b in seen), seen
    assert [a for a, _ in seen] == [2, 4, 8, 9, 9, 11, 11, 19]
