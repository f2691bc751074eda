"""Opening a run: one opener (Run.open) with a mode, and the store format it refuses."""

from __future__ import annotations

import pytest

from rayattr.store import Run, StoreError, StoreOptions, open_run_ref


def _run(tmp_path, **manifest) -> Run:
    return Run.create(str(tmp_path / "store"), "r", manifest, options=StoreOptions())


def test_read_mode_is_read_only_and_record_mode_writes(tmp_path):
    _run(tmp_path)
    uri = str(tmp_path / "store" / "r")
    with pytest.raises(StoreError, match="read-only"):
        open_run_ref(uri).write_json("x/y.json", {})
    open_run_ref(uri, mode="record").write_json("x/y.json", {"a": 1})
    assert Run.open_uri(uri).read_json("x/y.json") == {"a": 1}


def test_resume_mode_needs_the_recorded_config(tmp_path):
    _run(tmp_path)
    with pytest.raises(StoreError, match="no recorded config"):
        Run.open(str(tmp_path / "store"), "r", mode="resume")
    _run(tmp_path / "other", config={"train": {}})
    assert not Run.open(str(tmp_path / "other" / "store"), "r", mode="resume").readonly


def test_an_unknown_mode_is_refused(tmp_path):
    _run(tmp_path)
    with pytest.raises(StoreError, match="mode must be one of"):
        Run.open(str(tmp_path / "store"), "r", mode="write")
