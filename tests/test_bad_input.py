"""Bad input, none of it needing a Ray cluster: first through the library calls the job
makes (load_config, load_dataset, Run.create), then through the job itself, where each
mistake stops it before any Ray work, with exit code 2 and a message that names the problem.
(More data and store cases are in test_data.py and test_store.py; NaN/inf losses and resume
against another config in test_faults.py.) The only network target is 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from rayattr.config import ConfigError, load_config
from rayattr.data import DataError, load_dataset
from rayattr.store import Run, StoreError, StoreOptions, list_runs

ROOT = Path(__file__).resolve().parent.parent
# fake credentials so botocore never looks further (EC2 metadata) for real ones
FAKE_KEYS = {"key": "test-key", "secret": "test-secret"}


def closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def no_metadata_lookups(monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


# -- the library ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, phrases", [
    ("trian: {ranks: 2}\n", ["unknown config key 'trian'", "did you mean 'train'"]),
    ("train: {rank: 2}\n", ["unknown config key 'train.rank'", "did you mean 'train.ranks'"]),
    ("capture: {rnak: 16}\n", ["unknown config key 'capture.rnak'", "did you mean 'capture.rank'"]),
    ("data: {builtin: {n_trian: 10}}\n",
     ["unknown config key 'data.builtin.n_trian'", "did you mean 'data.builtin.n_train'"]),
    ("embed: {zzz: 1}\n", ["unknown config key 'embed.zzz'", "valid keys", "segments"]),
    ("train: 3\n", ["config section train must be a mapping"]),
    ("- a\n- b\n", ["must hold a mapping at the top level"]),
    ("train: {ranks: [\n", ["is not valid YAML"]),
])
def test_load_config_names_the_bad_key(tmp_path, text, phrases):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    for phrase in phrases:
        assert phrase in str(err.value), (phrase, str(err.value))


def write(path: Path, rows: list[dict], fmt: str, schema: pa.Schema | None = None) -> str:
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
@pytest.mark.parametrize("missing", ["text", "source"])
def test_load_dataset_without_text_or_source(tmp_path, fmt, missing):
    rows = [{k: v for k, v in {"id": i, "text": f"t{i}", "source": "s", "body": "x"}.items() if k != missing}
            for i in range(3)]
    path = write(tmp_path / f"no_{missing}.{fmt}", rows, fmt)
    with pytest.raises(DataError) as err:
        load_dataset(path)
    msg = str(err.value)
    assert f"lacks required column(s) ['{missing}']" in msg and f"no_{missing}.{fmt}" in msg, msg


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_load_dataset_empty(tmp_path, fmt):
    schema = pa.schema([("text", pa.string()), ("source", pa.string())])
    path = write(tmp_path / f"empty.{fmt}", [], fmt, schema)
    with pytest.raises(DataError, match=r"is empty \(no rows\)") as err:
        load_dataset(path)
    assert f"empty.{fmt}" in str(err.value)
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "README.txt").write_text("no data here")
    with pytest.raises(DataError, match="holds no data files"):
        load_dataset(str(tmp_path / "nothing"))
    with pytest.raises(DataError, match="empty list"):
        load_dataset([])


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_load_dataset_duplicate_ids(tmp_path, fmt):
    rows = [{"id": i, "text": f"t{i}", "source": "s"} for i in (3, 5, 3, 8, 5)]
    with pytest.raises(DataError, match=r"2 duplicated sample id\(s\), e.g. \[3, 5\]"):
        load_dataset(write(tmp_path / f"dups.{fmt}", rows, fmt))
    # unique inside each file, repeated across files
    a = write(tmp_path / f"a.{fmt}", [{"id": 1, "text": "x", "source": "s"}], fmt)
    b = write(tmp_path / f"b.{fmt}", [{"id": 1, "text": "y", "source": "s"}], fmt)
    with pytest.raises(DataError, match=r"1 duplicated sample id\(s\), e.g. \[1\]"):
        load_dataset([a, b])


def test_unreachable_store_fails_in_bounded_time():
    endpoint = f"http://127.0.0.1:{closed_port()}"
    opts = StoreOptions(storage_options={"endpoint_url": endpoint, **FAKE_KEYS},
                        connect_timeout_s=1, probe_attempts=3, backoff_s=0.1)
    for call in (lambda: Run.create("s3://bucket/x", "r", {}, options=opts),
                 lambda: Run.open("s3://bucket/x", "r", opts),
                 lambda: list_runs("s3://bucket/x", opts)):
        t0 = time.monotonic()
        with pytest.raises(StoreError, match=rf"unreachable at {endpoint} after 3 attempts"):
            call()
        assert time.monotonic() - t0 < 15


def test_unreachable_dataset_location_fails_in_bounded_time():
    endpoint = f"http://127.0.0.1:{closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(DataError) as err:
        load_dataset("s3://bucket/corpus/train.parquet", {"endpoint_url": endpoint, **FAKE_KEYS})
    assert time.monotonic() - t0 < 60  # botocore's own retries
    msg = str(err.value)
    assert "'s3://bucket/corpus/train.parquet'" in msg and f"(endpoint {endpoint})" in msg
    assert "object store unreachable" in msg


def test_unknown_uri_scheme():
    for uri in ("ftp://host/runs", "gs://bucket/runs", "hdfs:///runs"):
        scheme = uri.split(":")[0]
        with pytest.raises(StoreError, match=f"unsupported URI scheme '{scheme}'.*local paths, file:// and s3://"):
            Run.create(uri, "r", {})
    with pytest.raises(DataError, match="cannot open dataset location 'nosuch://b/train.parquet'.*nosuch"):
        load_dataset("nosuch://b/train.parquet")


# -- the job ----------------------------------------------------------------------------------


def job(tmp_path: Path, config: dict | None = None, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "jobs/pretrain_attr.py", "--store", str(tmp_path / "store"), "--no-progress", *args]
    if config is not None:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        argv += ["--config", str(path)]
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def assert_refused(out: subprocess.CompletedProcess, *phrases: str, before_ray: bool = True) -> None:
    assert out.returncode == 2, out.stderr[-2000:]
    err = out.stderr
    assert err.startswith("error: ") or "\nerror: " in err
    for phrase in phrases:
        assert phrase in err, (phrase, err[-2000:])
    assert "Traceback" not in err
    # Ray's own INFO line or the job's "ray: started a local Ray instance at ..."
    assert ("started a local ray" not in (out.stdout + err).lower()) == before_ray


def data_config(tmp_path: Path, train: str, validation: str | None = None) -> dict:
    return {"data": {"train": train, "validation": validation or train}}


@pytest.mark.parametrize("config, phrases", [
    ({"trian": {"ranks": 2}}, ["unknown config key 'trian'", "did you mean 'train'"]),
    ({"train": {"rank": 2}}, ["unknown config key 'train.rank'", "did you mean 'train.ranks'"]),
    ({"train": {"micro_batch": 0}}, ["micro_batch"]),
    ({"capture": {"curvature": "hessian"}}, ["capture.curvature", "'hessian'"]),
    ({"model": {"family": "bert"}}, ["model.family", "'bert'"]),
    ({"data": {"train": "x.parquet"}}, ["data.train and data.validation must be given together"]),
    ({"train": {"ranks": "two"}}, ["'train.ranks' must be an integer, got 'two'"]),
    ({"capture": {"rank": 0}}, ["capture.rank must be >= 1"]),
])
@pytest.mark.slow
def test_config_mistakes(tmp_path, config, phrases):
    assert_refused(job(tmp_path, config), *phrases)


@pytest.mark.slow
def test_missing_config_file(tmp_path):
    out = job(tmp_path, None, "--config", str(tmp_path / "nope.yaml"))
    assert_refused(out, "config file not found", "nope.yaml")


@pytest.mark.slow
def test_dataset_without_text_or_source(tmp_path):
    pq.write_table(pa.table({"body": ["a", "b"], "source": ["x", "y"]}), tmp_path / "no_text.parquet")
    assert_refused(job(tmp_path, data_config(tmp_path, str(tmp_path / "no_text.parquet"))), "'text'", "no_text.parquet")
    (tmp_path / "no_source.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    assert_refused(job(tmp_path, data_config(tmp_path, str(tmp_path / "no_source.jsonl"))), "'source'",
                   "no_source.jsonl")


@pytest.mark.slow
def test_empty_dataset(tmp_path):
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "source": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    assert_refused(job(tmp_path, data_config(tmp_path, str(tmp_path / "empty.parquet"))), "empty")


@pytest.mark.slow
def test_duplicate_sample_ids(tmp_path):
    pq.write_table(pa.table({"id": [1, 2, 2], "text": ["a", "b", "c"], "source": ["s", "s", "s"]}),
                   tmp_path / "dups.parquet")
    # ids are checked by the data stage's tasks (hash-partitioned), so on Ray, before the run exists
    assert_refused(job(tmp_path, data_config(tmp_path, str(tmp_path / "dups.parquet"))), "duplicated sample id",
                   "[2]", before_ray=False)
    assert not (tmp_path / "store").exists()


@pytest.mark.slow
def test_missing_dataset_file(tmp_path):
    assert_refused(job(tmp_path, data_config(tmp_path, str(tmp_path / "absent.parquet"))), "not found",
                   "absent.parquet")


@pytest.mark.slow
def test_unknown_store_scheme(tmp_path):
    out = job(tmp_path, None, "--store", "ftp://example/runs")
    assert_refused(out, "unsupported URI scheme 'ftp'")


@pytest.mark.slow
def test_unreachable_data_and_store_from_the_config(tmp_path, monkeypatch):
    """Endpoints from store.storage_options (credentials from the environment): the data on an
    unreachable S3 is named first; then, with the built-in data, the unreachable store."""
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    config = {"data": {"train": "s3://bucket/train/", "validation": "s3://bucket/val/"},
              "store": {"storage_options": {"endpoint_url": endpoint}}}
    assert_refused(job(tmp_path, config), "'s3://bucket/train/'", f"endpoint {endpoint}",
                   "object store unreachable")
    config = {"store": {"storage_options": {"endpoint_url": endpoint}}}
    assert_refused(job(tmp_path, config, "--store", "s3://bucket/runs"), f"unreachable at {endpoint}")
