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


@pytest.mark.parametrize("found", [1, None])
def test_a_run_of_another_store_format_is_refused_naming_both(tmp_path, found):
    import json

    from rayattr.errors import RayattrError
    from rayattr.store.run import STORE_FORMAT

    run = _run(tmp_path)
    path = tmp_path / "store" / "r" / "run.json"
    manifest = json.loads(path.read_text())
    if found is None:
        del manifest["store_format"]
    else:
        manifest["store_format"] = found
    path.write_text(json.dumps(manifest))
    for opener in (lambda: Run.open_uri(run.uri), lambda: open_run_ref(run.uri, mode="record")):
        with pytest.raises(RayattrError) as err:
            opener()
        assert (f"store format {found}, but this rayattr" in str(err.value)
                and f"reads store format {STORE_FORMAT} only" in str(err.value)), err.value
    assert STORE_FORMAT == 2
