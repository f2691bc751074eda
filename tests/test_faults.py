"""Faults injected into real runs: nothing is lost and the values equal a fault-free run.

Every run is the job script in its own process (its own local Ray), so a fault can kill
a rank actor, a segment actor or the driver itself (tests/faults.py at rayattr.runtime.hooks' seams).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import s3fs
import yaml

import faults
from faults import fired
from rayattr.store import GradientReader, Run, StoreOptions
from rayattr.store.layout import FINAL_WEIGHTS, TRAIN_PROGRESS

pytestmark = pytest.mark.slow  # each test runs the job, most of them twice

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "jobs" / "pretrain_attr.py"

# AdamW, the default optimizer: a resumed rank must bring back Adam's m, v and step as well
SMALL = {
    "data": {"seq_len": 32, "builtin": {"n_train": 160, "n_validation": 32, "max_chars": 96}},
    "train": {"ranks": 2, "micro_batch": 8, "epochs": 2, "lr": 3e-3, "checkpoint_every": 4,
              "optimizer": {"type": "adamw", "weight_decay": 0.1}, "deepspeed": {"zero_optimization": {"stage": 1}}},
    "capture": {"rank": 4},
    "embed": {"segments": 2, "phases": 4},
    "store": {"steps_per_shard": 4},
}  # 20 steps


def run_job(tmp: Path, *args: str, fault: str | None = None, env: dict | None = None,
            config: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    cfg_path = tmp / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config or SMALL))
    e = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **(env or {})}
    e.pop("RAY_ADDRESS", None)
    e.pop(faults.ENV, None)
    if fault:
        e.update(faults.env(fault, str(tmp)))
    return subprocess.run([sys.executable, str(JOB), "--config", str(cfg_path), "--no-progress", *args],
                          env=e, capture_output=True, text=True, timeout=timeout, cwd=tmp)


def values(run: Run) -> np.ndarray:
    return run.read_table("values/samples.parquet")["value"].to_numpy()


def assert_trajectory_complete(run: Run, num_steps: int, ranks: int = 2) -> None:
    """Every step recorded once, and every rank's gradients committed for every step."""
    steps = [r.step for r in run.step_records()]
    assert steps == list(range(num_steps))
    batches = GradientReader(run, kind="train").read_steps(0, None)
    assert [b.step for b in batches] == list(range(num_steps))
    for b, rec in zip(batches, run.step_records()):
        assert b.sample_ids.tolist() == rec.sample_ids
        assert sorted(set(b.ranks.tolist())) == list(range(ranks))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A fault-free run; its ranks' ray.train.report calls are recorded (test_reports_*)."""
    tmp = tmp_path_factory.mktemp("baseline")
    out = run_job(tmp, "--store", str(tmp / "store"), "--run-id", "clean", fault="ray.train.report")
    assert out.returncode == 0, out.stderr[-3000:]
    run = Run.open(str(tmp / "store"), "clean")
    assert_trajectory_complete(run, run.manifest["num_steps"])
    run.reports = faults.reports(str(tmp))
    return run


def test_ranks_report_only_checkpoints_and_the_end(baseline):
    """Each ray.train.report is a barrier through Ray Train's controller (seconds each): the
    ranks report at each checkpoint (every 4 steps) and once at the end, never for progress."""
    n = baseline.manifest["num_steps"]
    for rank in (0, 1):
        calls = [(r["step"], r["checkpoint"]) for r in baseline.reports if r["rank"] == rank]
        assert calls == [(s, True) for s in range(4, n + 1, 4)] + [(n, False)], calls


def restart_when_training(server, root: str, run_id: str, restarted: threading.Event) -> threading.Thread:
    """Restart the S3 server once the run's first training shard is committed."""
    fs = s3fs.S3FileSystem(**server.storage_options)

    def watch():
        deadline = time.time() + 240
        prefix = root.removeprefix("s3://") + f"/{run_id}/commits/train"
        while time.time() < deadline:
            try:
                if fs.find(prefix):
                    server.restart()
                    restarted.set()
                    return
            except Exception:  # noqa: BLE001 - the run may not exist yet
                pass
            fs.invalidate_cache()
            time.sleep(0.3)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


def test_every_process_killed_and_the_s3_server_restarted_then_resumed(baseline, tmp_path, s3_store):
    """One run on an S3 store, every fault in turn: the server restarts while the ranks write;
    rank 1 dies at step 10 and the gang resumes from the checkpoint of step 8; the driver dies
    at step 12; a new driver resumes the run from its last checkpoint, and one of its segment
    actors dies mid-segment and redoes its segment. DeepSpeed's checkpoints hold Adam's m, v
    and step: the trajectory, its update rows and the values are bit-equal to the fault-free
    run's."""
    root = s3_store.root_uri("restart")
    opts = StoreOptions(storage_options=s3_store.storage_options)
    restarted = threading.Event()
    watcher = restart_when_training(s3_store, root, "d", restarted)
    out = run_job(tmp_path, "--store", root, "--run-id", "d", fault="rank.step:rank=1,step=10;driver.train:step=12",
                  env=s3_store.env)
    watcher.join(timeout=5)
    assert restarted.is_set(), "the S3 server was never restarted during training"
    assert out.returncode == 17, out.stderr[-3000:]
    assert fired(str(tmp_path), "rank.step")
    # the gang restarted once, from the last checkpoint before step 10, before the driver died
    assert "restarting from the last checkpoint (step 8, restart 1)" in out.stderr, out.stderr[-3000:]
    partial = Run.open(root, "d", options=opts)
    assert partial.manifest["status"] == "training"
    assert not partial.exists("values/samples.parquet")
    # what the driver turns into run.json's train_restarts and resumed_from (it died before)
    progress = partial.read_json(TRAIN_PROGRESS)
    assert (progress["attempt"], progress["start"]) == (1, 8)

    # the same config again would be accepted; a different one is refused, naming the key
    bad = {**SMALL, "train": {**SMALL["train"], "lr": 0.1}}  # not the run's 3e-3
    out = run_job(tmp_path, "--store", root, "--resume", "d", config=bad, env=s3_store.env)
    assert out.returncode == 2 and "train.lr" in out.stderr and "different config" in out.stderr

    out = run_job(tmp_path, "--store", root, "--resume", "d", fault="segment.compute:segment=1,step=3",
                  env=s3_store.env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert fired(str(tmp_path), "segment.compute")
    run = Run.open(root, "d", options=opts)
    # the driver dies once rank 0 reports step 12; Ray Train's ranks run on until the cluster
    # goes, so the last complete checkpoint (every 4 steps) is step 12 or a later one
    assert run.manifest["status"] == "done"
    resumed = run.manifest.get("resumed_from")
    if resumed is not None:
        assert 12 <= resumed < run.manifest["num_steps"] and resumed % 4 == 0
        assert run.manifest["train_restarts"] == 0  # the resumed driver's gang ran through
    else:  # the dead driver's ranks ran on to the last step before its cluster went (their
        # writes are fenced by epoch, not stopped): the new driver found the final weights and
        # had nothing left to train, so it recorded no training of its own
        assert run.exists(FINAL_WEIGHTS)
    assert_trajectory_complete(run, run.manifest["num_steps"])
    assert run.step_records() == baseline.step_records()
    for a, b in zip(*(GradientReader(r, kind="update").read_steps(0, None) for r in (baseline, run))):
        assert all(np.array_equal(a.grads[n].numpy(), b.grads[n].numpy()) for n in a.grads), a.step
    np.testing.assert_array_equal(values(run), values(baseline))


def test_nan_loss_stops_and_keeps_what_was_committed(tmp_path):
    """A run stops at the first non-finite loss, says where, and keeps every step before it
    readable; its run records why it failed. When only one rank's loss turns NaN, all ranks
    still stop at that step and commit what they hold."""
    out = run_job(tmp_path, "--store", str(tmp_path / "store"), "--run-id", "nan", fault="rank.nan:rank=1,step=6")
    assert out.returncode == 2, out.stderr[-3000:]  # a user error (RayattrError): one line, exit 2
    m = re.search(r"loss is (nan|inf|-inf) at step (\d+)", out.stderr)
    assert m and int(m.group(2)) == 6, out.stderr[-3000:]
    bad_step = 6
    run = Run.open(str(tmp_path / "store"), "nan")
    assert run.manifest["status"] == "failed" and "at step" in run.manifest["error"]
    assert [r.step for r in run.step_records()] == list(range(bad_step))
    batches = GradientReader(run, kind="train").read_steps(0, None)
    assert [b.step for b in batches] == list(range(bad_step))
