"""The examples in jobs/examples/ as a user runs them: train with their own loop, then
`rayattr attribute <the URI they print last>` writes values/ for every recorded occurrence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rayattr.store import Run

pytestmark = pytest.mark.slow  # an example's training, then `rayattr attribute`

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def records_then_attribute(uri: str, ranks: int) -> None:
    """A recorded run as an example leaves it, then `rayattr attribute URI` as a user runs it."""
    run = Run.open_uri(uri)
    assert run.manifest["status"] == "recorded"

    # the trajectory: every step once, each a full global batch of distinct samples
    records = run.step_records()
    n, g = run.manifest["num_steps"], run.manifest["global_batch"]
    assert [r.step for r in records] == list(range(n)) and n > 1
    assert all(len(r.sample_ids) == g == len(set(r.sample_ids)) for r in records)
    assert {rk for r in records for rk in r.ranks} == set(range(ranks))
    assert all(0 < r.eta <= r.lr / g and 0 < r.clip <= 1 for r in records)

    run_cli("-m", "rayattr.cli", "attribute", uri, "--no-progress")
    run = Run.open_uri(uri)
    assert run.manifest["status"] == "done"
    samples = run.read_table("values/samples.parquet").to_pandas()
    assert len(samples) == n * g  # one value per occurrence
    assert np.isfinite(samples["value"]).all() and samples["value"].abs().max() > 0
    occurrences = sorted((r.step, i) for r in records for i in r.sample_ids)
    assert sorted(zip(samples["step"], samples["sample_id"])) == occurrences
    sources = run.read_table("values/sources.parquet").to_pandas()
    train = run.read_table("data/train.parquet").to_pandas()
    assert set(sources["source"]) == set(train["source"])
    # a second attribute is a no-op that reads the same values
    again = run_cli("-m", "rayattr.cli", "attribute", uri, "--no-progress")
    assert again.stdout.strip().splitlines()[-1] == f"run: {uri}"


def test_ray_train_example_then_attribute(tmp_path):
    """jobs/examples/ray_train_deepspeed.py on 2 ranks; the HF Trainer example's run is
    attributed in test_hf_deepspeed.py, which trains it anyway."""
    out = run_cli("jobs/examples/ray_train_deepspeed.py", "--store", str(tmp_path))
    records_then_attribute(out.stdout.strip().splitlines()[-1], ranks=2)
