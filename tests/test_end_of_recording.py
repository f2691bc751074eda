"""The end of a recording is a barrier: rank 0 marks a run recorded only once every rank's
writers are closed, and `rayattr attribute` refuses a run whose writers are still open,
naming them (after waiting `--wait SECONDS` for them)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rayattr import cli
from rayattr.pipeline.attribution import open_recorded
from rayattr.errors import USER_ERROR_EXIT
from rayattr.record import Recorder
from rayattr.store import GradientWriter, Run
from rayattr.store.registrations import OpenWritersError, current
from tests.test_recorder import LR, B, record_steps, setup  # noqa: F401  (the fixture)


def close_later(rec, after_s: float) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(after_s), rec.close()))
    t.start()
    return t


def test_rank0_marks_recorded_only_after_every_rank_closed(setup):  # noqa: F811
    cfg, run, data, model = setup
    rank0 = Recorder(model, run, cfg, optimizer=torch.optim.SGD(model.parameters(), lr=LR), rank=0, world_size=2)
    rank1 = Recorder(model, run, cfg, optimizer=torch.optim.SGD(model.parameters(), lr=LR), rank=1, world_size=2)
    with pytest.raises(OpenWritersError, match=r"rank 1 \(train; pid") as err:
        rank0.finish(timeout_s=0.2)  # rank 1 is still recording
    assert rank1.writer._id in str(err.value)
    assert run.reload_manifest()["status"] != "recorded"
    later = close_later(rank1, 0.3)
    rank0.finish(timeout_s=30)
    later.join()
    m = run.reload_manifest()
    assert m["status"] == "recorded"
    reg = current(run._storage, "train")[1]
    assert reg["status"] == "closed" and reg["time"] <= time.time()


def test_a_rank_that_never_registered_holds_the_end_back(setup):  # noqa: F811
    cfg, run, data, model = setup
    rank0 = Recorder(model, run, cfg, optimizer=torch.optim.SGD(model.parameters(), lr=LR), rank=0, world_size=3)
    with pytest.raises(OpenWritersError, match=r"rank 1 \(train\) has not registered.*rank 2 \(train\)"):
        rank0.finish(timeout_s=0.1)


def recorded_run(setup):  # noqa: F811
    cfg, run, data, model = setup
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rec = Recorder(model, run, cfg, optimizer=opt)
    record_steps(rec, model, opt, data, range(2))
    rec.finish()
    return run, rec.layer_dims()


def test_attribute_refuses_a_run_with_open_writers(setup, capsys):  # noqa: F811
    run, dims = recorded_run(setup)
    left_open = GradientWriter(Run.open_uri(run.uri, mode="record"), 1, dims, kind="curvature")
    with pytest.raises(OpenWritersError, match=rf"writer {left_open._id} of rank 1 \(curvature"):
        open_recorded(run.uri)
    t0 = time.monotonic()
    assert cli.main(["attribute", run.uri, "--wait", "0.3", "--no-progress"]) == USER_ERROR_EXIT
    assert time.monotonic() - t0 >= 0.3
    err = capsys.readouterr().err.strip()
    assert "after waiting 0.3 s" in err and "rank 1" in err and left_open._id in err and "\n" not in err, err
    later = close_later(left_open, 0.3)
    assert open_recorded(run.uri, wait_s=30).uri == run.uri  # --wait: the writer closed meanwhile
    later.join()


def test_wait_takes_seconds(capsys):
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["attribute", "r", "--wait", "-1"])
    assert cli.parser().parse_args(["attribute", "r", "--wait", "2.5"]).wait == 2.5
