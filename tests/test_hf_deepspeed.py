"""The HF Trainer under DeepSpeed, recorded by RecorderCallback through the Trainer's engine
(jobs/examples/hf_trainer.py): it records what the Trainer without DeepSpeed records, with
gradient accumulation, and on two ranks started by the plain `deepspeed` launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rayattr.store import GradientReader, Run
from test_examples import records_then_attribute

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = "jobs/examples/hf_trainer.py"


def record(store: Path, run_id: str, *flags: str, ranks: int = 1) -> Run:
    from s3server import pick_ports

    launcher = [sys.executable]
    if ranks > 1:
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
                    "--master_port", str(pick_ports(1)[0])]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*launcher, EXAMPLE, "--store", str(store), "--run-id", run_id, *flags],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = Run.open_uri(str(store / run_id))
    if ranks == 1:  # the example prints its run last (the deepspeed launcher adds its own line after it)
        assert Run.open_uri(out.stdout.strip().splitlines()[-1]).uri == run.uri
    assert run.manifest["status"] == "recorded" and run.manifest["world_size"] == ranks
    return run


def rows(run: Run, kind: str = "train") -> dict:
    return {(b.step, int(i)): {n: g[k] for n, g in b.grads.items()}
            for b in GradientReader(run, kind=kind).read_steps(0, None, dtype=torch.float64)
            for k, i in enumerate(b.sample_ids)}


def assert_same_recording(got: Run, want: Run, *, close_steps: int | None = None, kinds=("train",)) -> None:
    """The same steps, samples and optimizer bookkeeping; step sizes, losses and rows equal to
    float32 rounding (for the first `close_steps` steps: AdamW amplifies rounding over steps)."""
    a, b = got.step_records(), want.step_records()
    n = len(b) if close_steps is None else close_steps
    assert [r.step for r in a] == [r.step for r in b] and len(b) > n / 2
    for x, y in zip(a, b):
        assert x.sample_ids == y.sample_ids and x.sources == y.sources and x.epoch == y.epoch
        assert (x.adam_step, x.precondition_step) == (y.adam_step, y.precondition_step)
        if x.step < n:
            assert x.lr == y.lr
            assert x.clip == pytest.approx(y.clip, rel=1e-5) and x.eta == pytest.approx(y.eta, rel=1e-5)
            if y.loss is not None and x.loss is not None:  # with accumulation no loss is recorded
                assert x.loss == pytest.approx(y.loss, rel=1e-5)
    assert any(r.clip < 1 for r in b[:n])  # clipping is active: κ read from the engine's step
    for kind in kinds:
        ra, rb = rows(got, kind), rows(want, kind)
        assert ra.keys() == rb.keys()
        for key, w in rb.items():
            if key[0] < n:
                for layer, want_row in w.items():  # each row to 1e-4 of its norm
                    assert (ra[key][layer] - want_row).norm() <= 1e-4 * want_row.norm() + 1e-9, (kind, key, layer)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


@pytest.fixture(scope="module")
def deepspeed_one(store):
    return record(store, "ds")


@pytest.mark.slow
def test_example_then_attribute(store, deepspeed_one, tmp_path):
    """The example as a user runs it (DeepSpeed, one rank), then `rayattr attribute` on it."""
    import shutil

    shutil.copytree(deepspeed_one.uri, tmp_path / "ds")  # the shared recording stays unattributed
    records_then_attribute(str(tmp_path / "ds"), ranks=1)


@pytest.mark.slow
def test_deepspeed_records_what_the_plain_trainer_records(store, deepspeed_one):
    assert_same_recording(deepspeed_one, record(store, "plain", "--no-deepspeed"))


@pytest.mark.slow
def test_accumulation_and_two_ranks_under_the_deepspeed_launcher(store, deepspeed_one):
    """The same global batch of 8: two micro-batches of 4, and two ranks of 4 each."""
    assert_same_recording(record(store, "accum", "--grad-accum", "2"), deepspeed_one)
    two = record(store, "two", ranks=2)
    assert {rk for r in two.step_records() for rk in r.ranks} == {0, 1}
    assert_same_recording(two, deepspeed_one)


@pytest.mark.slow
def test_adamw_under_deepspeed(store):
    """AdamW: every step's update rows use that step's own P (the v its update divided by, read
    after it), and the same rows and update rows until float32 rounding, amplified by 1/√v,
    parts the two trajectories (measured: 1e-6 relative at step 2, 1e-5 at step 11, 3e-2 at
    step 23)."""
    ds = record(store, "adamw-ds", "--optimizer", "adamw")
    recs = ds.step_records()
    assert [r.precondition_step for r in recs] == [r.adam_step for r in recs] == list(range(1, len(recs) + 1))
    assert_same_recording(ds, record(store, "adamw-plain", "--optimizer", "adamw", "--no-deepspeed"),
                          close_steps=8, kinds=("train", "update"))


def test_deepspeed_needs_the_trainer():
    from rayattr.integrations.hf import RecorderCallback

    args = SimpleNamespace(remove_unused_columns=False, deepspeed={"zero_optimization": {"stage": 0}})
    with pytest.raises(ValueError, match="trainer=trainer"):
        RecorderCallback("/nowhere", None).on_train_begin(args, None, None, model=torch.nn.Linear(2, 2))
    trainer = SimpleNamespace(model_wrapped=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not a DeepSpeed engine"):
        RecorderCallback("/nowhere", None, trainer=trainer).on_train_begin(args, None, None)
