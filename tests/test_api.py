"""rayattr.open_run on a run whose tables are written here: what it reads, and which runs it
refuses (on a real finished run: test_query.py and test_cli_first_use.py)."""

from __future__ import annotations

import pyarrow as pa
import pytest

import rayattr
from rayattr.query import RunNotFinished
from rayattr.store import Run, StoreError

TABLES = {
    "samples": pa.table({"sample_id": [1, 2], "source": ["a", "b"], "step": [0, 0], "epoch": [0, 0],
                         "value": [0.5, -0.25]}),
    "sources": pa.table({"source": ["a", "b"], "n_samples": [1, 1], "n_occurrences": [1, 1],
                         "value": [0.5, -0.25], "value_per_sample": [0.5, -0.25]}),
    "phases": pa.table({"source": ["a", "b"], "phase": [0, 0], "step_start": [0, 0], "step_end": [1, 1],
                        "n_occurrences": [1, 1], "value": [0.5, -0.25]}),
    "layers": pa.table({"source": ["a", "a"], "layer": ["h.0", "h.1"], "value": [0.125, 0.375]}),
}


def test_open_run_reads_each_table_of_a_finished_run(tmp_path):
    run = Run.create(str(tmp_path), "r", {})
    for name, table in TABLES.items():
        run.write_table(f"values/{name}.parquet", table)
    run.update_manifest(status="done")
    got = rayattr.open_run(run.uri)
    assert got.uri == run.uri and got.manifest["status"] == "done" and repr(got) == f"FinishedRun({run.uri!r})"
    for method, name in {"values": "samples", "sources": "sources", "phases": "phases", "layers": "layers"}.items():
        assert getattr(got, method)().equals(TABLES[name]), method


@pytest.mark.parametrize("status, message", [("recorded", "rayattr attribute"), ("training", "status 'training'")])
def test_open_run_refuses_an_unfinished_run(tmp_path, status, message):
    run = Run.create(str(tmp_path), "r", {})
    run.update_manifest(status=status)
    with pytest.raises(RunNotFinished, match=message):
        rayattr.open_run(run.uri)


def test_open_run_of_an_unknown_run_names_those_that_exist(tmp_path):
    Run.create(str(tmp_path), "there", {})
    with pytest.raises(StoreError, match="there"):
        rayattr.open_run(str(tmp_path / "missing"))
