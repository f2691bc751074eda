"""Bad input through the job itself: each mistake stops it before any Ray work, with exit
code 2 and a message that names the problem (the library-level errors are in test_data.py,
test_store.py and test_faults.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def job(tmp_path: Path, config: dict | None = None, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "jobs/pretrain_attr.py", "--store", str(tmp_path / "store"), "--no-progress", *args]
    if config is not None:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        argv += ["--config", str(path)]
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def assert_refused(out: subprocess.CompletedProcess, *phrases: str) -> None:
    assert out.returncode == 2, out.stderr[-2000:]
    err = out.stderr
    assert err.startswith("error: ") or "\nerror: " in err
    for phrase in phrases:
        assert phrase in err, (phrase, err[-2000:])
    assert "Traceback" not in err
    assert "Started a local Ray" not in out.stdout + err


def data_config(tmp_path: Path, train: str, validation: str | None = None) -> dict:
    return {"data": {"train": train, "validation": validation or train}}


@pytest.mark.parametrize("config, phrases", [
    ({"trian": {"ranks": 2}}, ["unknown config key 'trian'", "did you mean 'train'"]),
    ({"train": {"rank": 2}}, ["unknown config key 'train.rank'", "did you mean 'train.ranks'"]),
    ({"train": {"micro_batch": 0}}, ["micro_batch"]),
    ({"capture": {"curvature": "hessian"}}, ["capture.curvature", "'hessian'"]),
    ({"model": {"family": "bert"}}, ["model.family", "'bert'"]),
    ({"data": {"train": "x.parquet"}}, ["data.train and data.validation must be given together"]),
])
def test_config_mistakes(tmp_path, config, phrases):
    assert_refused(job(tmp_path, config), *phrases)


def test_missing_config_file(tmp_path):
    out = job(tmp_path, None, "--config", str(tmp_path / "nope.yaml"))
    assert_refused(out, "config file not found", "nope.yaml")


def test_dataset_without_text_or_source(tmp_path):
    pq.write_table(pa.table({"body": ["a", "b"], "source": ["x", "y"]}), tmp_path / "no_text.parquet")
    assert_refused(job(tmp_path, data_config(tmp_path, str(tmp_path / "no_text.parquet"))), "'text'", "no_text.parquet")
    (tmp_path / "no_source.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    assert_refused(job(tmp_path, data_config(tmp_path, str(tmp_path / "no_source.jsonl"))), "'source'",
                   "no_source.jsonl")


def test_empty_dataset(tmp_path):
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "source": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    assert_refused(job(tmp_path, data_config(tmp_path, str(tmp_path / "empty.parquet"))), "empty")


def test_duplicate_sample_ids(tmp_path):
    pq.write_table(pa.table({"id": [1, 2, 2], "text": ["a", "b", "c"], "source": ["s", "s", "s"]}),
                   tmp_path / "dups.parquet")
    assert_refused(job(tmp_path, data_config(tmp_path, str(tmp_path / "dups.parquet"))), "duplicated sample id")


def test_missing_dataset_file(tmp_path):
    assert_refused(job(tmp_path, data_config(tmp_path, str(tmp_path / "absent.parquet"))), "not found",
                   "absent.parquet")


def test_unknown_store_scheme(tmp_path):
    out = job(tmp_path, None, "--store", "ftp://example/runs")
    assert_refused(out, "ftp")


def test_resume_of_a_run_that_does_not_exist(tmp_path):
    assert_refused(job(tmp_path, None, "--resume", "ghost"), "'ghost' does not exist")
