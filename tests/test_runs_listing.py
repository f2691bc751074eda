"""`rayattr runs` hides no run: one whose run.json cannot be read is listed as unreadable,
with the reason, next to the readable ones."""

from __future__ import annotations

import json
import os

from rayattr.cli import main
from rayattr.store import Run, list_runs


def test_unreadable_runs_are_listed_with_the_reason(store_root, capsys):
    Run.create(store_root.uri, "good", {"model_family": "gpt2"}, options=store_root.options)
    bad = Run.create(store_root.uri, "garbled", {}, options=store_root.options)
    bad._storage.put_bytes("run.json", b'{"run_id": "garbled", "stat')  # a torn write
    arr = Run.create(store_root.uri, "listed", {}, options=store_root.options)
    arr._storage.put_bytes("run.json", b"[1, 2]")
    if store_root.backend == "local":  # a run.json that cannot be read at all
        Run.create(store_root.uri, "dir", {}, options=store_root.options)
        path = os.path.join(store_root.uri, "dir", "run.json")
        os.unlink(path)
        os.mkdir(path)

    runs = {r["run_id"]: r for r in list_runs(store_root.uri, store_root.options)}
    expected = {"good", "garbled", "listed"} | ({"dir"} if store_root.backend == "local" else set())
    assert set(runs) == expected  # every run is listed, unreadable ones too
    assert runs["good"]["status"] == "created" and "error" not in runs["good"]
    assert runs["garbled"]["status"] == "unreadable"
    assert runs["garbled"]["error"].startswith("run.json is not valid JSON")
    assert runs["listed"]["error"] == "run.json holds a JSON list, not an object"
    if "dir" in runs:
        assert runs["dir"]["status"] == "unreadable"
        assert runs["dir"]["error"].startswith("run.json cannot be read (IsADirectoryError")

    args = ["runs", store_root.uri, "--format", "json"]
    for k, v in store_root.options.storage_options.items():
        args += ["--storage-option", f"{k}={v}"]
    assert main(args) == 0
    rows = {r["run_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["garbled"]["status"] == "unreadable" and "not valid JSON" in rows["garbled"]["error"]
    assert rows["good"]["error"] is None
