"""rayattr.store against local files and a real S3 server (SeaweedFS), same tests on both."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import torch

from rayattr.store import (GradientReader, GradientWriter, Run, StepRecord, StoreError,
                           StoreOptions, list_runs, open_store_fs)
from rayattr.store.retry import with_retries
from rayattr.store.storage import Storage
from rayattr.store.uploader import BackgroundUploader

LAYERS = {"blocks.0.attn": 48, "blocks.0.mlp": 32, "lm_head": 16}
PROJECTION = {"kind": "kronecker", "seed": 7, "r_a": 8, "r_s": 6}
TESTS_DIR = str(Path(__file__).parent)


def make_step(step: int, rank: int, world: int = 1, batch: int = 4, layers=LAYERS):
    """Deterministic rows of one rank at one step: ids, sources, positions, grads (float32)."""
    gen = torch.Generator().manual_seed(step * 1009 + rank)
    ids = [step * 1000 + rank * 100 + i for i in range(batch)]
    sources = [f"src{(i + rank) % 3}" for i in range(batch)]
    positions = [i * world + rank for i in range(batch)]  # ranks interleave in the global batch
    grads = {name: torch.randn(batch, p, generator=gen) for name, p in layers.items()}
    return ids, sources, positions, grads


def new_run(root, run_id="run-1", **manifest):
    manifest.setdefault("layers", LAYERS)
    manifest.setdefault("projection", PROJECTION)
    return Run.create(root.uri, run_id, manifest, options=root.options)


def write_rank(run, rank, steps, world=1, dtype="float32", steps_per_shard=3, **kw):
    with GradientWriter(run, rank, LAYERS, dtype=dtype, steps_per_shard=steps_per_shard,
                        **kw) as w:
        for s in steps:
            ids, src, pos, g = make_step(s, rank, world)
            w.write_step(s, ids, src, g, positions=pos)
    return w


def expected_step(step, world, dtype=torch.float32):
    """Global batch of a step as the reader must return it (ranks interleaved by position)."""
    rows = []
    for rank in range(world):
        ids, src, pos, g = make_step(step, rank, world)
        for i in range(len(ids)):
            rows.append((pos[i], ids[i], src[i], {k: v[i].to(dtype) for k, v in g.items()}))
    rows.sort(key=lambda r: r[0])
    grads = {k: torch.stack([r[3][k] for r in rows]) for k in LAYERS}
    return [r[1] for r in rows], [r[2] for r in rows], grads


# -- URIs and filesystems ---------------------------------------------------------------------

def test_open_store_fs_schemes(tmp_path):
    fs, path = open_store_fs(str(tmp_path))
    assert path == str(tmp_path) and fs.protocol[0] in ("file", "local")
    fs2, path2 = open_store_fs(f"file://{tmp_path}/x")
    assert path2 == f"{tmp_path}/x" and type(fs2) is type(fs)
    fs3, path3 = open_store_fs("s3://bucket/a/b/", StoreOptions(
        storage_options={"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"}))
    assert path3 == "bucket/a/b" and "s3" in fs3.protocol
    with pytest.raises(StoreError, match="unsupported URI scheme 'gs'"):
        open_store_fs("gs://bucket/x")
    with pytest.raises(StoreError, match="names no bucket"):
        open_store_fs("s3://")


# -- runs -------------------------------------------------------------------------------------

def test_run_lifecycle(store_root):
    run = new_run(store_root, world_size=2, model={"name": "gpt2"})
    m = run.manifest
    assert m["run_id"] == "run-1" and m["world_size"] == 2 and m["model"] == {"name": "gpt2"}
    assert m["status"] == "created" and m["rayattr_version"] and m["created"]
    with pytest.raises(StoreError, match="already exists"):
        new_run(store_root)
    assert Run.create(store_root.uri, "run-1", {}, store_root.options, exist_ok=True).manifest == m

    run.update_manifest(status="training", step_count=10)
    ro = Run.open(store_root.uri, "run-1", store_root.options)
    assert ro.manifest["status"] == "training" and ro.manifest["step_count"] == 10
    assert Run.open_uri(run.uri, store_root.options).manifest["status"] == "training"
    with pytest.raises(StoreError, match="read-only"):
        ro.write_json("values/x.json", {"a": 1})

    run.write_json("values/summary.json", {"auc": 0.5})
    run.write_bytes("embeddings/blob.bin", b"\x00\x01\x02")
    table = pa.table({"sample_id": [1, 2, 3], "value": [0.5, -1.0, 2.0]})
    run.write_table("values/samples.parquet", table)
    run.write_table("values/samples.arrow", table)
    assert ro.read_json("values/summary.json") == {"auc": 0.5}
    assert ro.read_bytes("embeddings/blob.bin") == b"\x00\x01\x02"
    assert ro.read_table("values/samples.parquet").equals(table)
    assert ro.read_table("values/samples.arrow").equals(table)
    assert ro.exists("values/summary.json") and not ro.exists("values/nope.json")
    assert ro.list("values") == ["samples.arrow", "samples.parquet", "summary.json"]
    with pytest.raises(StoreError, match="does not exist"):
        ro.read_bytes("values/nope.json")
    with pytest.raises(StoreError, match="managed by the store"):
        run.write_bytes("commits/train/x.json", b"{}")
    with pytest.raises(StoreError, match="invalid path"):
        run.write_bytes("../escape", b"")

    new_run(store_root, "run-2")
    runs = list_runs(store_root.uri, store_root.options)
    assert [r["run_id"] for r in runs] == ["run-1", "run-2"]
    assert runs[0]["status"] == "training" and runs[0]["uri"] == run.uri
    with pytest.raises(StoreError, match="run 'run-3' does not exist.*run-1"):
        Run.open(store_root.uri, "run-3", store_root.options)


def test_secrets_never_reach_the_manifest(store_root):
    with pytest.raises(StoreError, match="credential"):
        new_run(store_root, storage_options={"secret": "x"})
    run = new_run(store_root)
    raw = run.read_bytes("run.json").decode()
    for secret in store_root.options.secret_values():
        assert secret not in raw
    assert "secret" not in repr(store_root.options)
    if store_root.backend == "s3":
        with pytest.raises(StoreError, match="credential value"):
            run.update_manifest(note=f"debug {store_root.server.secret_key}")


# -- gradients: round trip, concurrency, commit protocol ---------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_roundtrip_bit_exact(store_root, dtype):
    run = new_run(store_root)
    world, steps = 2, range(8)
    for rank in range(world):
        w = write_rank(run, rank, steps, world, dtype=dtype)
        assert w.last_committed_step == 7
    tdtype = getattr(torch, dtype)
    reader = GradientReader(Run.open_uri(run.uri, store_root.options), projection=PROJECTION)
    assert reader.committed_steps() == list(steps) and reader.ranks == [0, 1]
    batches = reader.read_steps(0, 8)
    assert [b.step for b in batches] == list(steps)
    for b in batches:
        ids, src, grads = expected_step(b.step, world, tdtype)
        assert b.sample_ids.tolist() == ids and b.sources == src
        assert b.positions.tolist() == list(range(8)) and b.ranks.tolist() == [0, 1] * 4
        for name in LAYERS:  # stored dtype -> float32 is exact
            assert b.grads[name].dtype == torch.float32
            assert torch.equal(b.grads[name], grads[name].float()), name
    # A sub-range (crossing shard boundaries), a layer subset, and the storage dtype back.
    part = reader.read_steps(2, 5, layers=["lm_head"], dtype=tdtype)
    assert [b.step for b in part] == [2, 3, 4] and list(part[0].grads) == ["lm_head"]
    assert part[1].grads["lm_head"].dtype == tdtype
    assert torch.equal(part[1].grads["lm_head"], expected_step(3, world, tdtype)[2]["lm_head"])


def test_concurrent_writers_merge_in_global_batch_order(store_root):
    run = new_run(store_root)
    world, steps = 4, list(range(10))
    errors = []

    def rank_main(rank):
        try:
            write_rank(run, rank, steps, world, steps_per_shard=4, queue_depth=1)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    reader = GradientReader(run)
    assert reader.committed_steps() == steps and reader.ranks == [0, 1, 2, 3]
    for b in reader.iter_steps(0, None):
        ids, src, grads = expected_step(b.step, world)
        assert b.sample_ids.tolist() == ids and b.sources == src
        assert all(torch.equal(b.grads[k], grads[k]) for k in LAYERS)
    # One step per fetch window: partial shard reads with the next window prefetched.
    small = GradientReader(run, window_bytes=1)
    got = small.read_steps(3, 9, layers=["blocks.0.mlp"])
    assert [b.step for b in got] == list(range(3, 9))
    assert all(torch.equal(b.grads["blocks.0.mlp"], expected_step(b.step, world)[2]["blocks.0.mlp"])
               for b in got)


def test_curvature_rows_without_sample_ids_and_empty_steps(store_root):
    run = new_run(store_root)
    layers = {"lm_head": 16}
    for rank in range(2):
        with GradientWriter(run, rank, layers, kind="curvature", dtype="bfloat16") as w:
            for s in range(3):
                n = 0 if (rank == 1 and s == 1) else 2  # rank 1 sampled nothing at step 1
                w.write_step(s, [-1] * n, ["sampled"] * n,
                             {"lm_head": torch.full((n, 16), float(s * 10 + rank))})
    assert GradientReader(run).committed_steps() == []  # other kinds are separate
    batches = GradientReader(run, kind="curvature").read_steps()
    assert [len(b) for b in batches] == [4, 2, 4]
    assert batches[1].sample_ids.tolist() == [-1, -1] and batches[1].ranks.tolist() == [0, 0]
    assert batches[2].grads["lm_head"][:, 0].tolist() == [20.0, 20.0, 21.0, 21.0]


def test_steps_visible_only_when_all_open_ranks_committed(store_root):
    run = new_run(store_root)
    w0 = GradientWriter(run, 0, LAYERS, steps_per_shard=2)
    w1 = GradientWriter(run, 1, LAYERS, steps_per_shard=2)
    for s in range(6):
        w0.write_step(s, *_rows(s, 0))
    w0.flush()
    for s in range(3):
        w1.write_step(s, *_rows(s, 1))
    w1.flush()
    reader = GradientReader(run)
    assert reader.committed_steps() == [0, 1, 2]  # rank 1 still open at step 2
    w1.close()  # rank 1 finished: no longer holds the others back
    w0.close()
    reader.refresh()
    assert reader.committed_steps() == list(range(6))
    assert [len(b) for b in reader.read_steps(2, 4)] == [8, 4]


def test_writers_with_step_ranges_only_hold_back_their_own_steps(store_root):
    run = new_run(store_root)
    layers = {"lm_head": 16}
    seg0 = GradientWriter(run, 0, layers, kind="local", step_range=(0, 4))
    with GradientWriter(run, 1, layers, kind="local", step_range=(4, 8)) as seg1:
        for s in range(4, 8):
            seg1.write_step(s, [s], ["a"], {"lm_head": torch.ones(1, 16)})
    seg0.write_step(0, [0], ["a"], {"lm_head": torch.ones(1, 16)})
    seg0.flush()
    # Segment 0 is still running (steps 1-3 pending) but does not hide segment 1's steps.
    assert GradientReader(run, kind="local").committed_steps() == [0, 4, 5, 6, 7]
    with pytest.raises(StoreError, match="outside this writer's step_range"):
        seg0.write_step(4, [4], ["a"], {"lm_head": torch.ones(1, 16)})
    seg0.close()


def _rows(step, rank, world=2):
    ids, src, pos, g = make_step(step, rank, world)
    return ids, src, g, pos


KILLED_WRITER = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
from test_store import LAYERS, make_step
from rayattr.store import GradientWriter, Run
run = Run.open_uri(sys.argv[1], mode="record")   # credentials from the AWS_* environment
w = GradientWriter(run, 0, LAYERS, steps_per_shard=2, queue_depth=1)
print("ready", flush=True)
step = 0
while True:
    ids, src, pos, g = make_step(step, 0)
    w.write_step(step, ids, src, g, positions=pos)
    step += 1
    time.sleep(0.002)
"""


def test_killed_writer_leaves_only_committed_data(store_root):
    run = new_run(store_root)
    env = {**os.environ, **store_root.env, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, run.uri, TESTS_DIR], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"writer exited early: {proc.stderr.read().decode()[-2000:]}")
            if len(GradientReader(run).committed_steps()) >= 8:
                break
            time.sleep(0.05)
        else:
            pytest.fail("writer committed nothing within 60 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()

    reader = GradientReader(run)
    steps = reader.committed_steps()
    last = steps[-1]
    assert steps == list(range(last + 1)) and last >= 7
    for b in reader.iter_steps():  # whole shards only, and bit-exact (checksums verified too)
        ids, src, grads = expected_step(b.step, 1)
        assert b.sample_ids.tolist() == ids and all(torch.equal(b.grads[k], grads[k]) for k in LAYERS)

    w = GradientWriter(run, 0, LAYERS, steps_per_shard=2)  # the restarted rank
    assert w.last_committed_step == last
    storage = run._storage
    committed = {e["shard"] for e in map(json.loads, storage.get_many(
        storage.find("commits/train/r0000")))}
    assert set(storage.find("grads/train/r0000")) == committed  # leftovers removed
    with pytest.raises(StoreError, match="already committed"):
        w.write_step(last, *_rows(last, 0, 1))
    for s in range(last + 1, last + 4):
        w.write_step(s, *_rows(s, 0, 1))
    w.close()
    reader.refresh()
    assert reader.committed_steps() == list(range(last + 4))
    b = reader.read_steps(last + 3, last + 4)[0]
    assert torch.equal(b.grads["lm_head"], expected_step(last + 3, 1)[2]["lm_head"])


def test_uncommitted_leftovers_are_invisible_and_removed(store_root):
    run = new_run(store_root)
    write_rank(run, 0, range(4), steps_per_shard=2)
    # A crash between the shard PUT and its commit entry leaves an orphan shard.
    run._storage.put_bytes("grads/train/r0000/00000004-00000005.arrow", b"half")
    reader = GradientReader(run)
    assert reader.committed_steps() == [0, 1, 2, 3]
    w = GradientWriter(run, 0, LAYERS)
    assert w.last_committed_step == 3
    assert "grads/train/r0000/00000004-00000005.arrow" not in run._storage.find("grads")
    w.close()


def test_corrupted_shard_is_detected(store_root):
    run = new_run(store_root)
    write_rank(run, 0, range(4), steps_per_shard=4)
    entry = json.loads(run._storage.get_bytes(run._storage.find("commits/train/r0000")[0]))
    shard = entry["shard"]
    data = bytearray(run._storage.get_bytes(shard))
    step2 = next(p for p in entry["steps"] if p["step"] == 2)
    data[step2["offset"] + step2["length"] - 20] ^= 0xFF  # flip bits inside step 2's floats
    run._storage.put_bytes(shard, bytes(data))
    reader = GradientReader(run)
    with pytest.raises(StoreError, match=r"checksum mismatch in shard .*00000000-00000003(\.e\d+)?\.arrow"):
        reader.read_steps()
    with pytest.raises(StoreError, match=r"step 2"):
        reader.read_steps(2, 3)
    # Row-group reads verify only what they fetch: other steps of the shard stay readable.
    ok = reader.read_steps(0, 2)
    assert torch.equal(ok[1].grads["lm_head"], expected_step(1, 1)[2]["lm_head"])


def test_step_range_read_fetches_only_those_steps(tmp_path, monkeypatch):
    root = type("R", (), {"uri": str(tmp_path), "options": StoreOptions()})
    run = new_run(root)
    write_rank(run, 0, range(16), steps_per_shard=16)
    fetched = []
    orig = Storage.get_ranges

    def spy(self, rels, starts, ends):
        fetched.extend(e - s for r, s, e in zip(rels, starts, ends) if r.endswith(".arrow"))
        return orig(self, rels, starts, ends)

    monkeypatch.setattr(Storage, "get_ranges", spy)
    shard_bytes = json.loads(run._storage.get_bytes(
        run._storage.find("commits/train/r0000")[0]))["bytes"]
    GradientReader(run).read_steps(5, 7)
    assert sum(fetched) < shard_bytes / 4
    fetched.clear()
    GradientReader(run).read_steps()
    assert fetched == [shard_bytes]  # a whole shard is one read


def test_grad_shards_readable_with_pyarrow_dataset(tmp_path):
    root = type("R", (), {"uri": str(tmp_path), "options": StoreOptions()})
    run = new_run(root)
    for rank in range(2):
        write_rank(run, rank, range(5), world=2)
    table = ds.dataset(f"{run.uri}/grads/train", format="arrow").to_table()
    assert table.num_rows == 2 * 5 * 4
    assert sorted(set(table.column("rank").to_pylist())) == [0, 1]
    assert table.schema.field("lm_head").type == pa.list_(pa.float32(), 16)


# -- step records -----------------------------------------------------------------------------

def test_step_records_commit_and_latest_wins(store_root):
    run = new_run(store_root)
    recs = [StepRecord(s, 0, 0.1, 0.1 / 4, [s * 10 + i for i in range(4)], ["a"] * 4,
                       [0, 1, 0, 1]) for s in range(5)]
    run.write_step_records(recs[:3])
    run.write_step_records(recs[3:])
    redo = StepRecord(4, 1, 0.05, 0.0125, [7, 8], ["b", "c"], [1, 0])
    run.write_step_records([redo])  # a restarted driver re-records step 4
    got = Run.open_uri(run.uri, store_root.options).step_records()
    assert [r.step for r in got] == [0, 1, 2, 3, 4]
    assert got[:4] == recs[:4] and got[4] == redo
    with pytest.raises(StoreError, match="differ in length"):
        run.write_step_records([StepRecord(9, 0, 0.1, 0.1, [1, 2], ["a"], [0, 0])])


def test_step_losses_read_two_columns_and_latest_wins(store_root, monkeypatch):
    """`rayattr show` and `report` read each chunk's step and loss columns, not its per-sample lists."""

    run = new_run(store_root)
    # per-sample lists much larger than the two columns (and than the 64 KiB a footer read takes)
    ids = np.random.default_rng(0).integers(0, 1 << 40, 40_000).tolist()
    run.write_step_records([StepRecord(s, 0, 0.1, 0.1, ids, ["a"] * 40_000, [0] * 40_000, loss=1.0 / (s + 1))
                            for s in range(3)])
    run.write_step_records([StepRecord(2, 0, 0.1, 0.1, [1], ["a"], [0], loss=None)])  # re-recorded
    run = Run.open_uri(run.uri, store_root.options)
    assert [(r.step, r.loss) for r in run.step_losses()] == [(0, 1.0), (1, 0.5), (2, None)]
    from rayattr.data.shards import _Counting

    readers = []
    opened = run._storage.open_read

    def counting(rel):
        readers.append(_Counting(opened(rel)))
        return readers[-1]
    monkeypatch.setattr(run._storage, "open_read", counting)
    run.step_losses()
    whole = sum(run._storage.sizes("steps").values())
    read = [r.count for r in readers]
    assert sum(read) < 0.5 * whole, (sum(read), whole)


# -- bad input --------------------------------------------------------------------------------

def test_bad_input_errors(store_root):
    run = new_run(store_root)
    with pytest.raises(StoreError, match="projection spec does not match.*seed"):
        GradientWriter(run, 0, LAYERS, projection={**PROJECTION, "seed": 8})
    with pytest.raises(StoreError, match="layer 'blocks.0.mlp' has dim 33"):
        GradientWriter(run, 0, {**LAYERS, "blocks.0.mlp": 33})
    with pytest.raises(StoreError, match="layer 'extra' is not one of"):
        GradientWriter(run, 0, {**LAYERS, "extra": 4})
    with pytest.raises(StoreError, match="unsupported gradient storage dtype"):
        GradientWriter(run, 0, LAYERS, dtype="int8")
    w = GradientWriter(run, 0, LAYERS)
    ids, src, pos, g = make_step(0, 0)
    with pytest.raises(StoreError, match="unknown layer 'nope'"):
        w.write_step(0, ids, src, {**g, "nope": g["lm_head"]})
    with pytest.raises(StoreError, match="'lm_head' is missing"):
        w.write_step(0, ids, src, {k: v for k, v in g.items() if k != "lm_head"})
    with pytest.raises(StoreError, match=r"shape \(4, 15\)"):
        w.write_step(0, ids, src, {**g, "lm_head": g["lm_head"][:, :15]})
    w.write_step(3, ids, src, g, pos)
    with pytest.raises(StoreError, match="steps must increase"):
        w.write_step(3, ids, src, g, pos)
    w.close()
    reader = GradientReader(run)
    with pytest.raises(StoreError, match="unknown layer 'blocks.9'"):
        reader.read_steps(layers=["blocks.9"])
    with pytest.raises(StoreError, match="projection spec does not match"):
        GradientReader(run, projection={"kind": "gaussian"})
    with pytest.raises(StoreError, match="invalid gradient kind"):
        GradientReader(run, kind="Bad Kind")


def test_upload_errors_surface_on_next_call(tmp_path):
    root = type("R", (), {"uri": str(tmp_path), "options": StoreOptions()})
    run = new_run(root)
    w = GradientWriter(run, 0, LAYERS, steps_per_shard=1)
    Path(run.uri, "grads/train").mkdir(parents=True)
    Path(run.uri, "grads/train/r0000").write_text("not a directory")  # shard PUTs now fail
    w.write_step(0, *_rows(0, 0, 1))
    with pytest.raises(OSError):
        w.flush()
    with pytest.raises(OSError):
        w.close()
    assert GradientReader(run).committed_steps() == []


def test_uploader_back_pressure_and_ordering():
    up = BackgroundUploader(depth=1)
    gate, done = threading.Event(), []
    up.submit(lambda: (gate.wait(5), done.append(1)))
    up.submit(lambda: done.append(2))  # fills the queue
    t = threading.Thread(target=up.submit, args=(lambda: done.append(3),))
    t.start()
    t.join(0.3)
    assert t.is_alive()  # blocked: back-pressure
    gate.set()
    t.join(5)
    up.drain()
    assert done == [1, 2, 3]

    def boom():
        raise ValueError("disk on fire")

    up.submit(boom)
    up.submit(lambda: done.append(4))  # dropped: nothing runs after a failure
    with pytest.raises(ValueError, match="disk on fire"):
        up.drain()
    assert done == [1, 2, 3]
    with pytest.raises(ValueError):
        up.close()


# -- S3 connection errors ---------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_missing_credentials(s3_store, monkeypatch, tmp_path):
    for var in list(os.environ):
        if var.startswith("AWS_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    opts = StoreOptions(storage_options={"endpoint_url": s3_store.endpoint_url})
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="missing S3 credentials"):
        Run.create(s3_store.root_uri(), "r", {}, options=opts)
    assert time.monotonic() - t0 < 10


def test_s3_unreachable_endpoint_fails_fast():
    opts = StoreOptions(storage_options={"endpoint_url": f"http://127.0.0.1:{_free_port()}",
                                         "key": "k", "secret": "s"},
                        connect_timeout_s=1, probe_attempts=3, backoff_s=0.1)
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=r"unreachable at http://127.0.0.1:\d+ after 3 attempts"):
        Run.open("s3://rayattr-test/x", "r", opts)
    assert time.monotonic() - t0 < 10


def test_s3_wrong_secret_and_missing_bucket(s3_store):
    bad = StoreOptions(storage_options={**s3_store.storage_options, "secret": "wrong-secret"},
                       max_attempts=1)
    with pytest.raises(StoreError, match="access denied"):
        list_runs(s3_store.root_uri(), bad)
    good = StoreOptions(storage_options=s3_store.storage_options)
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        Run.create("s3://no-such-bucket/x", "r", {}, options=good)


def test_s3_credentials_and_endpoint_from_environment(s3_store, monkeypatch):
    for k, v in s3_store.env.items():
        monkeypatch.setenv(k, v)
    root = s3_store.root_uri("env")
    run = Run.create(root, "r", {"layers": LAYERS})  # default StoreOptions: AWS_* environment
    write_rank(run, 0, range(2))
    assert GradientReader(Run.open(root, "r")).committed_steps() == [0, 1]


def test_with_retries_backs_off_then_gives_up():
    opts = StoreOptions(max_attempts=3, backoff_s=0.01)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("peer reset")
        return "ok"

    assert with_retries(flaky, "op", opts) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(StoreError, match="op: object store unreachable at http://x after 3"):
        with_retries(lambda: calls.append(1) or (_ for _ in ()).throw(TimeoutError()), "op",
                     opts, "http://x")
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(FileNotFoundError):  # not transient: no retry
        with_retries(lambda: calls.append(1) or open("/nonexistent/x"), "op", opts)
    assert len(calls) == 1


def test_s3_writer_rides_out_a_server_restart(s3_store):
    opts = StoreOptions(storage_options=s3_store.storage_options, connect_timeout_s=1,
                        read_timeout_s=5, max_attempts=12, backoff_s=0.25, backoff_max_s=2)
    run = Run.create(s3_store.root_uri("restart"), "r", {"layers": LAYERS}, options=opts)
    w = GradientWriter(run, 0, LAYERS, steps_per_shard=2, queue_depth=4)
    for s in range(4):
        w.write_step(s, *_rows(s, 0, 1))
    w.flush()
    s3_store.stop(grace=0.5)
    try:
        for s in range(4, 8):  # returns at once: uploads retry in the background
            w.write_step(s, *_rows(s, 0, 1))
    finally:
        s3_store.start()
    w.close()
    reader = GradientReader(run)
    assert reader.committed_steps() == list(range(8))
    for b in reader.iter_steps(4):
        assert torch.equal(b.grads["lm_head"], expected_step(b.step, 1)[2]["lm_head"])
