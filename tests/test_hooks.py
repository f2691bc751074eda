"""Fault injection lives in the tests: the package has only empty seams (rayattr.runtime.hooks), and no
environment variable in a user's environment can kill a worker or turn the loss NaN.

The seams the fault tests (tests/faults.py) act at must fire where the faults belong: here the
rank's (rank.step, rank.loss) and the driver's (driver.train), driven without Ray or DeepSpeed;
segment.compute and index.compact fire in test_segment_stream.py and test_index.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rayattr.runtime import hooks
from rayattr.config import Config
from rayattr.store import Run
from rayattr.train import trainer
from rayattr.model.loss import micro_batch_loss
from rayattr.train.worker import RankWorker

ROOT = Path(__file__).resolve().parent.parent
# every name the fault machinery ever answered to, old and new
FAULT_ENV = {"RAYATTR_FAULT": "rank.nan:rank=1,step=1", "RAYATTR_TEST_FAULT": "rank.nan:rank=1,step=1"}
VOCAB = 11


@pytest.fixture(autouse=True)
def no_hooks():
    hooks.clear()
    yield
    hooks.clear()


def test_seams_are_empty_in_production():
    code = ("import pkgutil, importlib, rayattr\n"
            "from rayattr.runtime import hooks\n"
            "for m in pkgutil.walk_packages(rayattr.__path__, 'rayattr.'):\n"
            "    importlib.import_module(m.name)\n"
            "assert hooks.registered() == {}, hooks.registered()\n")
    env = {**os.environ, **FAULT_ENV, "RAYATTR_FAULT_DIR": "/nonexistent"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_hooks_call_and_pass():
    seen = []
    hooks.register("p", lambda **at: seen.append(at))
    hooks.register("v", lambda value, **at: value * at["k"])
    hooks.register("v", lambda value, **at: value + 1)
    hooks.call("p", step=3)
    assert seen == [{"step": 3}]
    assert hooks.passed("v", 5, k=2) == 11 and hooks.passed("none", 5) == 5
    assert hooks.registered() == {"p": 1, "v": 2}
    hooks.clear()
    assert hooks.registered() == {}


# -- the rank: RankWorker.train_steps on a stand-in engine, data and recorder -----------------


class Engine(torch.nn.Module):
    """Plays the DeepSpeed engine: a model that also takes backward() and step()."""

    def __init__(self, events: list):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, VOCAB)
        self.events = events

    def forward(self, input_ids, attention_mask):
        return self.emb(input_ids)

    def backward(self, loss):
        self.events.append(("backward", loss.detach().clone()))

    def step(self):
        self.events.append(("engine.step",))


class Data:
    """This rank's rows: two samples per step, a fixed micro-batch per step."""

    def share(self, step):
        return np.array([10 * step, 10 * step + 1]), np.array(["a", "b"])

    def step_ids(self, step):  # the global batch: this rank's rows are all of it here
        return self.share(step)

    def micro_batch(self, step, micro):
        ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(100 * step + micro))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


class Recorder:
    curvature = None

    def __init__(self, events: list):
        self.events = events

    @contextlib.contextmanager
    def step(self, sample_ids, sources, step, epoch, global_batch=None):
        self.events.append(("record", step, sample_ids))
        yield

    def add_loss(self, loss):
        self.events.append(("add_loss", loss.detach().clone()))



def rank_worker(rank: int, events: list) -> RankWorker:
    w = RankWorker.__new__(RankWorker)  # its __init__ joins a process group and builds a DeepSpeed engine
    w.rank, w.world_size, w.cfg, w.device, w.num_steps = rank, 2, Config(), "cpu", 3
    w.data, w.engine, w.recorder = Data(), Engine(events), Recorder(events)
    w.plan = type("Plan", (), {"epoch_of": staticmethod(lambda step: 0)})()
    return w


def true_loss(w: RankWorker, step: int) -> torch.Tensor:
    b = Data().micro_batch(step, 0)
    with torch.no_grad():
        return micro_batch_loss(w.engine, b["input_ids"], b["attention_mask"], b["labels"])


def test_rank_seams_fire_before_each_step_and_the_loss_seam_is_what_the_rank_trains_on():
    events: list = []
    hooks.register("rank.step", lambda **at: events.append(("rank.step", at)))
    hooks.register("rank.loss", lambda loss, **at: loss * (2.0 if at == {"rank": 1, "step": 1} else 1.0))
    w = rank_worker(1, events)
    w.train_steps(0, 5)  # past num_steps: stops at 3
    starts = [e[1] for e in events if e[0] == "rank.step"]
    assert starts == [{"rank": 1, "step": s} for s in range(3)]
    # the step seam comes before anything of its step is recorded: a rank killed there
    # leaves that step wholly unrecorded
    for s in range(3):
        i = events.index(("rank.step", {"rank": 1, "step": s}))
        assert events[i + 1][:2] == ("record", s) and events[i + 1][2] == [10 * s, 10 * s + 1]
    trained = [e[1] for e in events if e[0] == "backward"]
    recorded = [e[1] for e in events if e[0] == "add_loss"]
    want = [true_loss(w, s) * (2.0 if s == 1 else 1.0) for s in range(3)]
    for got_b, got_r, w_ in zip(trained, recorded, want, strict=True):
        torch.testing.assert_close(got_b, w_)
        torch.testing.assert_close(got_r, w_)


def test_fault_variables_change_nothing_at_the_rank_seams(monkeypatch, tmp_path):
    """The variables that once made rank 1's loss NaN at step 1: the rank trains on its true loss."""
    for k, v in {**FAULT_ENV, "RAYATTR_FAULT_DIR": str(tmp_path), "RAYATTR_TEST_FAULT_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(k, v)
    events: list = []
    w = rank_worker(1, events)
    w.train_steps(0, 3)
    trained = [e[1] for e in events if e[0] == "backward"]
    assert all(torch.isfinite(t) for t in trained)
    for s, got in enumerate(trained):
        torch.testing.assert_close(got, true_loss(w, s))
    assert not list(tmp_path.iterdir())


# -- the driver: trainer._follow with Ray Train's fit stood in for ---------------------------


def test_driver_seam_fires_once_per_reported_chunk_across_a_restart(tmp_path):
    run = Run.create(str(tmp_path / "store"), "r", {"num_steps": 12})
    reports = [  # what rank 0 writes to train/progress.json, one per look of the driver
        {"attempt": 0, "start": 0, "step": 0, "loss": None},
        {"attempt": 0, "start": 0, "step": 4, "loss": 1.0},
        {"attempt": 0, "start": 0, "step": 4, "loss": 1.0},  # no new chunk since the last look
        {"attempt": 0, "start": 0, "step": 8, "loss": 0.9},
        {"attempt": 1, "start": 4, "step": 4, "loss": None},  # a rank died: the gang restarted
        {"attempt": 1, "start": 4, "step": 8, "loss": 0.95},
        {"attempt": 1, "start": 4, "step": 12, "loss": 0.8},
    ]
    looks = iter(reports)

    class Fit:  # trainer.Fit's wait: each look of the driver finds the next report
        def wait(self, timeout):
            state = next(looks, None)
            if state is None:
                return True  # fit returned
            run.write_json(trainer.TRAIN_PROGRESS, state)
            return False

    fired = []
    hooks.register("driver.train", lambda **at: fired.append(at))
    losses = trainer._follow(run, Fit(), progress=False)
    assert fired == [{"step": 4}, {"step": 8}, {"step": 8}, {"step": 12}]
    assert losses == [1.0, 0.9, 0.95, 0.8]


def test_fit_runs_in_a_driver_thread_and_raises_what_fit_raised():
    """trainer.Fit: the driver follows while fit runs; fit's failure comes out of result()."""
    import threading

    release = threading.Event()

    class Trainer:
        def __init__(self, error=None):
            self.error = error

        def fit(self):
            release.wait(5)
            if self.error:
                raise self.error

    ok, failing = trainer.Fit(Trainer()), trainer.Fit(Trainer(RuntimeError("gang failed")))
    assert not ok.wait(0.05) and not failing.wait(0)  # both still fitting
    release.set()
    assert ok.wait(5) and failing.wait(5)
    ok.result()
    with pytest.raises(RuntimeError, match="gang failed"):
        failing.result()
