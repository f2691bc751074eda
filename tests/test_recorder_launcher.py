"""The Recorder under a launcher (no Ray): two data-parallel ranks record what one rank
records for the same global batches (rows, step sizes, clip coefficients, losses), started by
torchrun and by the plain `deepspeed` launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rayattr
from rayattr.config import Config
from rayattr.store import GradientReader, Run

pytestmark = pytest.mark.slow  # each test trains under torchrun or the deepspeed launcher

ROOT = Path(__file__).resolve().parent.parent


def launch(launcher: str, ranks: int, port: int) -> list[str]:
    if launcher == "deepspeed":  # the `deepspeed` command; --no_local_rank: the loop reads RUN_URI from argv[1]
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
                "--master_port", str(port), "--no_local_rank"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port)]


def record(store: Path, ranks: int, port: int, launcher: str = "torchrun") -> Run:
    cfg = Config.from_dict({
        "run_id": f"{launcher}{ranks}", "store": {"uri": str(store), "steps_per_shard": 2},
        "model": {"n_layer": 1, "n_embd": 16, "n_head": 2},
        "data": {"seq_len": 16, "builtin": {"n_train": 32, "n_validation": 8, "max_chars": 64}},
        "train": {"ranks": ranks, "micro_batch": 8 // ranks, "lr": 0.5, "optimizer": {"type": "sgd"}}, "capture": {"rank": 2},
    }).validate()
    run = rayattr.new_run(cfg)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*launch(launcher, ranks, port), "tests/launcher_loop.py", run.uri],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return Run.open_uri(run.uri)


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Run:
    """The loop on one rank under torchrun: what both launchers' two ranks must record."""
    from s3server import pick_ports

    return record(tmp_path_factory.mktemp("one"), 1, pick_ports(1)[0])


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_ranks_record_what_one_rank_records(one, tmp_path, launcher):
    from s3server import pick_ports

    two = record(tmp_path, 2, pick_ports(1)[0], launcher)
    assert two.manifest["status"] == "recorded" and two.manifest["world_size"] == 2
    r1, r2 = one.step_records(), two.step_records()
    assert [r.step for r in r2] == [0, 1, 2]
    for a, b in zip(r1, r2):
        assert b.sample_ids == a.sample_ids and b.sources == a.sources
        assert b.ranks == [0] * 4 + [1] * 4 and a.ranks == [0] * 8
        assert b.clip < 1.0  # clipping is active: κ from the norm taken before engine.step()
        assert b.clip == pytest.approx(a.clip, rel=1e-5) and b.eta == pytest.approx(a.eta, rel=1e-5)
        assert b.loss == pytest.approx(a.loss, rel=1e-5)
    rows = {}
    for name, run in (("one", one), ("two", two)):
        rows[name] = {(batch.step, int(i)): {n: g[k] for n, g in batch.grads.items()}
                      for batch in GradientReader(run, kind="train").read_steps(0, None, dtype=torch.float64)
                      for k, i in enumerate(batch.sample_ids)}
    assert rows["one"].keys() == rows["two"].keys() and len(rows["one"]) == 24
    for key, want in rows["one"].items():
        for n in want:
            torch.testing.assert_close(rows["two"][key][n], want[n], rtol=1e-4, atol=1e-6)
