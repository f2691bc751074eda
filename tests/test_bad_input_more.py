"""Bad input, second round: each gets a one-line error naming the problem and leaves nothing
half-written; a store path with spaces or non-ASCII letters simply works. Only 127.0.0.1 is
ever a network target."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from rayattr.data import BatchPlan, DataError, TokenizedDataset, load_dataset, load_tokenizer
from rayattr.store import GradientReader, GradientWriter, Run, StoreOptions, list_runs

ROOT = Path(__file__).resolve().parent.parent


def job(tmp: Path, config: dict, *args: str, env: dict | None = None, timeout: float = 300):
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    e = {**os.environ, **(env or {})}
    e.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "jobs/pretrain_attr.py", "--config", str(cfg), "--no-progress", *args],
                          cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def one_line_error(out) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and lines and lines[-1].startswith("error: "), out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    return lines[-1]


def texts(n: int, source="s", length=20) -> dict:
    return {"id": list(range(n)), "text": [f"def f{i}(x): return x" [:length] for i in range(n)],
            "source": [source] * n}


def refusal(tmp: Path, train: Path, validation: Path) -> str:
    """The line the job prints after "error: " when start_run (the job's data check and run
    creation, which come before any training) refuses these files, made in this process; and
    nothing is half-written. test_bad_input runs the job itself on such refusals, before Ray
    starts and on Ray's data stage: exit code 2, that one line, no traceback."""
    from rayattr.config import Config
    from rayattr.errors import error_line
    from rayattr.pipeline.stages import start_run

    cfg = Config().with_overrides(**{"store.uri": str(tmp / "store"), "run_id": "r", "data.train": str(train),
                                     "data.validation": str(validation)}).validate()
    with pytest.raises(DataError) as err:
        start_run(cfg)
    line = error_line(err.value)
    assert line and "\n" not in line and "Traceback" not in line
    assert not (tmp / "store").exists()  # checked before the run is created
    return line


@pytest.mark.parametrize("column,values,found", [
    ("text", pa.array([b"abc"] * 4, pa.binary()), "binary"),
    ("source", pa.array([1, 2, 3, 4], pa.int64()), "int64"),
])
def test_wrong_column_types(tmp_path, column, values, found):
    """Said from the files' schemas before Ray starts (no Ray here)."""
    good = texts(4)
    good[column] = values
    pq.write_table(pa.table(good), tmp_path / "train.parquet")
    pq.write_table(pa.table(texts(4)), tmp_path / "val.parquet")
    line = refusal(tmp_path, tmp_path / "train.parquet", tmp_path / "val.parquet")
    assert f"column '{column}'" in line and "must hold strings" in line and found in line


def test_empty_source_string(tmp_path, local_ray):
    """Found in the rows, by the data stage's Ray Data tasks (the session's local Ray)."""
    rows = texts(6)
    rows["source"][2] = rows["source"][4] = ""
    pq.write_table(pa.table(rows), tmp_path / "train.parquet")
    with pytest.raises(DataError, match=r"column 'source' in dataset file .* has 2 empty value\(s\), e.g. row\(s\) \[2, 4\]"):
        load_dataset(str(tmp_path / "train.parquet"))  # an empty source would become a source named ""
    pq.write_table(pa.table(texts(4)), tmp_path / "val.parquet")
    assert "2 empty value(s)" in refusal(tmp_path, tmp_path / "train.parquet", tmp_path / "val.parquet")


def test_only_the_trained_rows_count_as_truncated(tmp_path):
    """Truncation is what training does (and queries do likewise); a run counts it in run.json
    n_truncated over the rows its trained steps use (unused data costs nothing, docs/store.md).
    The data stage runs in this process here (no Ray): the same block functions as on Ray Data.
    The job's note from that count: tests/test_job.py."""
    from rayattr.config import Config
    from rayattr.data.run_data import token_meta
    from rayattr.pipeline.stages import start_run

    rows = texts(48)
    long = "x = 1  # " + "a long comment " * 10
    for i in range(0, 48, 4):
        rows["text"][i] = long
    pq.write_table(pa.table(rows), tmp_path / "train.parquet")
    pq.write_table(pa.table(texts(8)), tmp_path / "val.parquet")
    seq_len = 32
    table = load_dataset(str(tmp_path / "train.parquet"))
    assert TokenizedDataset(table, load_tokenizer("byte"), seq_len).num_truncated == 12
    plan = BatchPlan(table.num_rows, 8, 2, 1, 2, 0)  # the default micro_batch, ranks, grad_accum, epochs, seed
    used = np.unique(np.concatenate([plan.global_batch(s) for s in range(2)]))
    expected = TokenizedDataset(table.take(used), load_tokenizer("byte"), seq_len).num_truncated
    assert 0 < expected < 12 and len(used) == 32
    cfg = Config.from_dict({"run_id": "r", "data": {"train": str(tmp_path / "train.parquet"),
                                                    "validation": str(tmp_path / "val.parquet"), "seq_len": seq_len},
                            "train": {"steps": 2}, "capture": {"rank": 4}, "store": {"uri": str(tmp_path / "store")}})
    assert token_meta(start_run(cfg))["n_truncated"] == expected  # what each rank reports in run.json


def test_store_path_with_spaces_and_unicode(store_root, capsys):
    from rayattr.cli import main

    root = f"{store_root.uri}/my störe ü/x y"
    run = Run.create(root, "r", {"layers": {"l": 2}}, options=store_root.options)
    with GradientWriter(run, 0, {"l": 2}) as w:
        w.write_step(0, [0], ["s"], {"l": torch.ones(1, 2)})
    again = Run.open(root, "r", store_root.options)
    assert GradientReader(again).committed_steps() == [0]
    assert [r["run_id"] for r in list_runs(root, store_root.options)] == ["r"]
    args = ["runs", root, "--format", "csv"]
    for k, v in store_root.options.storage_options.items():
        args += ["--storage-option", f"{k}={v}"]
    assert main(args) == 0 and "\nr," in capsys.readouterr().out


def test_wrong_s3_credentials(tmp_path, s3_store):
    """Credentials that are wrong, not absent: SeaweedFS enforces them."""
    env = {**s3_store.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    root = s3_store.root_uri("wrongcreds")
    out = job(tmp_path, yaml.safe_load((ROOT / "jobs/configs/small.yaml").read_text()), "--store", root,
              "--run-id", "r", env=env, timeout=120)
    line = one_line_error(out)
    assert "access denied" in line and "not-the-secret" not in out.stderr
    assert list_runs(root, StoreOptions(storage_options=s3_store.storage_options)) == []


@pytest.mark.slow
def test_run_deleted_while_query_reads_it(finished_run, tmp_path, monkeypatch, capsys):
    """On a copy of the session's finished run (any finished run does)."""
    from rayattr.cli import main
    from rayattr.query import answer

    copy = tmp_path / "store" / "r"
    shutil.copytree(finished_run[1], copy)
    opening = answer.embedding_reader

    def deleted_first(run, *a, **kw):  # the model is loaded; the embeddings are next
        shutil.rmtree(copy)
        return opening(run, *a, **kw)

    monkeypatch.setattr(answer, "embedding_reader", deleted_first)
    assert main(["query", str(copy), "--text", "def parse(s):", "--k", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "was deleted while being read" in err[-1], err
    assert "keep_sample_embeddings" not in err[-1]  # the error names the deleted file, not a setting
