"""The `rayattr` command on a real finished run: what each command prints, and its errors."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys

import pytest

from rayattr.cli import main
from rayattr.store import Run
from conftest import last_source


def rayattr(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_console_script_is_installed():
    out = subprocess.run(["rayattr", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "query" in out.stdout and "report" in out.stdout


def test_runs(capsys, finished_run):
    store, _ = finished_run
    code, out, _ = rayattr(capsys, "runs", store)
    assert code == 0
    header, _, row = out.splitlines()[:3]
    assert header.split() == ["run_id", "status", "model", "num_steps", "n_train", "n_sources", "created"]
    assert row.split()[:6] == ["answers", "done", "gpt2", "20", "160", "7"]
    code, out, _ = rayattr(capsys, "runs", store, "--format", "json")
    assert json.loads(out)[0]["run_id"] == "answers"
    code, _, err = rayattr(capsys, "runs", f"{store}-typo")
    assert code == 2 and "no store at" in err and "does not exist" in err


def test_values_formats(capsys, finished_run):
    _, uri = finished_run
    sources = Run.open_uri(uri).read_table("values/sources.parquet").to_pylist()
    code, out, _ = rayattr(capsys, "values", uri, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["source"] for r in rows] == [s["source"] for s in sources]
    assert float(rows[0]["value_per_sample"]) == pytest.approx(sources[0]["value_per_sample"])
    code, out, _ = rayattr(capsys, "values", uri)
    assert out.splitlines()[0].split() == ["source", "n_samples", "n_occurrences", "value", "value_low", "value_high", "value_per_sample"]
    assert out.splitlines()[2].split()[0] == sources[0]["source"]
    code, out, _ = rayattr(capsys, "values", uri, "--by-phase", "--format", "json")
    phases = json.loads(out)
    assert {p["phase"] for p in phases} == {0, 1, 2, 3}
    assert sum(p["value"] for p in phases) == pytest.approx(sum(s["value"] for s in sources), rel=1e-4)


def test_query_json_and_table(capsys, finished_run, tmp_path):
    _, uri = finished_run
    train = Run.open_uri(uri).read_table("data/train.parquet").to_pylist()
    target = next(r for r in train if r["source"] == "data")
    code, out, _ = rayattr(capsys, "query", uri, "--text", target["text"], "--k", "3", "--format", "json")
    answer = json.loads(out)
    assert code == 0 and {"helpful", "harmful", "run_id", "queries", "k", "projection_rank"} <= set(answer)
    assert answer["run_id"] == "answers" and answer["k"] == 3 and answer["projection_rank"] == 32
    assert answer["queries"] == [{"index": 0, "text": target["text"],
                                  "sha256": hashlib.sha256(target["text"].encode()).hexdigest()}]
    assert all(set(r) == {"sample_id", "source", "step", "score", "se", "within_noise", "text"}
               for r in answer["helpful"])
    # every answer carries the projection's standard error of its score
    assert all(r["se"] > 0 and r["within_noise"] == (abs(r["score"]) < 2 * r["se"]) for r in answer["helpful"])
    assert len(answer["helpful"]) == 3 and len(answer["harmful"]) == 3

    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"text": target["text"]}) + "\n")
    code, out, _ = rayattr(capsys, "query", uri, "--file", str(queries), "--by-source")
    assert code == 0 and "most helpful (10)" in out and "most harmful" in out and "sources:" in out


def test_query_errors(capsys, finished_run, tmp_path):
    store, uri = finished_run
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    code, _, err = rayattr(capsys, "query", uri, "--file", str(empty))
    assert code == 2 and "holds no query texts" in err
    code, _, err = rayattr(capsys, "query", f"{store}/no-such-run", "--text", "x")
    assert code == 2 and "does not exist" in err and "answers" in err  # lists the runs there
    code, _, err = rayattr(capsys, "query", uri, "--text", "token " * 100, "--k", "1")
    assert code == 0 and "note: query 0 has" in err and "first 32 tokens" in err
    busy = Run.create(str(tmp_path), "busy", {"config": {}})  # not in the shared store: others list it
    busy.update_manifest(status="embedding")
    code, _, err = rayattr(capsys, "values", busy.uri)
    assert code == 2 and "not finished" in err and "embedding" in err


def test_bad_arguments_exit_2_without_traceback(capsys, finished_run, tmp_path):
    _, uri = finished_run
    for k in ("0", "-3", "x"):
        with pytest.raises(SystemExit) as exit_:
            main(["query", uri, "--text", "hello", "--k", k])
        assert exit_.value.code == 2 and "argument --k" in capsys.readouterr().err
    code, _, err = rayattr(capsys, "query", uri)
    assert code == 2 and "--text" in err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = rayattr(capsys, "report", uri, "--out", str(blocker / "rep"))
    assert code == 2 and err.startswith("error: ") and "a-file" in err and "Traceback" not in err
    code, _, err = rayattr(capsys, "values", uri, "--storage-option", "no-equals-sign")
    assert code == 2 and "KEY=VALUE" in err


def test_values_by_layer(capsys, finished_run):
    _, uri = finished_run
    code, out, _ = rayattr(capsys, "values", uri, "--by-layer", "--format", "json")
    rows = json.loads(out)
    assert code == 0 and {"source", "layer", "value"} == set(rows[0])
    code, out, _ = rayattr(capsys, "values", uri, "--format", "json")
    for src in json.loads(out):  # the layers' parts add up to the source's value
        parts = sum(r["value"] for r in rows if r["source"] == src["source"])
        assert parts == pytest.approx(src["value"], rel=1e-4, abs=1e-9)


def test_report_command(capsys, finished_run, tmp_path):
    _, uri = finished_run
    code, out, _ = rayattr(capsys, "report", uri, "--out", str(tmp_path / "rep"))
    assert code == 0 and (tmp_path / "rep" / "report.html").is_file()
    assert out.strip() == f"report: {tmp_path / 'rep' / 'report.html'}"


def test_plan_subcommand(capsys):
    code, out, _ = rayattr(capsys, "plan", "jobs/configs/default.yaml")
    assert code == 0 and out.strip()
    code, _, err = rayattr(capsys, "plan", "no-such.yaml")
    assert code == 2 and "not found" in err


def test_module_entry_point(finished_run):
    out = subprocess.run([sys.executable, "-m", "rayattr.cli", "values", finished_run[1], "--format", "json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)[-1]["source"] == last_source(finished_run[1])


ANSWER_OBJECTS = ("run.json", "data", "values", "weights/final.safetensors", "grads/embeddings",
                  "commits/embeddings", "writers/embeddings")


def test_commands_on_s3_with_storage_options(capsys, finished_run, s3_store):
    """The run's answer objects copied to S3 (SeaweedFS) give the same answers through
    --storage-option, with no AWS variables in the environment."""
    import s3fs

    store, uri = finished_run
    root = s3_store.root_uri("cli")
    fs = s3fs.S3FileSystem(**s3_store.storage_options)
    for rel in ANSWER_OBJECTS:
        fs.put(f"{uri}/{rel}", f"{root}/answers/{rel}".removeprefix("s3://"), recursive=True)
    opts = [f"--storage-option={k}={v}" for k, v in s3_store.storage_options.items()]
    code, out, _ = rayattr(capsys, "runs", root, *opts, "--format", "json")
    assert code == 0 and [r["run_id"] for r in json.loads(out)] == ["answers"]
    code, out, _ = rayattr(capsys, "values", f"{root}/answers", *opts, "--format", "json")
    local = Run.open_uri(uri).read_table("values/sources.parquet").to_pylist()
    assert code == 0 and json.loads(out) == local  # JSON floats round-trip exactly
    query = ["query", "--text", "Return a new sorted list.", "--k", "4", "--format", "json"]
    code, on_s3, _ = rayattr(capsys, query[0], f"{root}/answers", *opts, *query[1:])
    code_local, here, _ = rayattr(capsys, query[0], uri, *query[1:])
    assert code == code_local == 0
    on_s3, here = json.loads(on_s3), json.loads(here)
    for key in ("helpful", "harmful"):
        assert [r["sample_id"] for r in on_s3[key]] == [r["sample_id"] for r in here[key]]
        assert [r["score"] for r in on_s3[key]] == pytest.approx([r["score"] for r in here[key]], rel=1e-6)
