"""A new user's first commands (issue 16): naming runs, start-up without torch, pipes, `show`,
`gc`, query output, recorded loss, pandas, and a job output without known-harmless noise."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rayattr.cli import main
from rayattr.store import Run, StepRecord, StoreError
from conftest import last_source

ROOT = Path(__file__).resolve().parent.parent


def rayattr(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def env_here() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


# ------------------------------------------------------------------ naming a run


def test_bare_run_id_is_found_in_the_default_store(capsys, finished_run, monkeypatch, tmp_path):
    store, _ = finished_run
    monkeypatch.setenv("RAYATTR_STORE", store)
    code, out, _ = rayattr(capsys, "values", "answers", "--format", "json")
    assert code == 0 and json.loads(out)[-1]["source"] == last_source(finished_run[1])
    code, out, _ = rayattr(capsys, "runs", "--format", "json")  # `runs` defaults to the store too
    _, named, _ = rayattr(capsys, "runs", store, "--format", "json")
    # other tests add runs to this shared store: the default lists exactly what naming it does
    assert code == 0 and "answers" in [r["run_id"] for r in json.loads(out)] and out == named

    # without RAYATTR_STORE: ./rayattr_runs
    monkeypatch.delenv("RAYATTR_STORE")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rayattr_runs").symlink_to(store)
    code, out, _ = rayattr(capsys, "show", "answers", "--format", "json")
    assert code == 0 and json.loads(out)["run_id"] == "answers"


def test_wrong_run_name_lists_the_runs_of_the_store(capsys, finished_run, monkeypatch, tmp_path):
    store, _ = finished_run
    monkeypatch.setenv("RAYATTR_STORE", store)
    code, _, err = rayattr(capsys, "values", "answerz")
    assert code == 2 and "'answerz' does not exist" in err and "existing runs: ['answers']" in err
    monkeypatch.delenv("RAYATTR_STORE")
    monkeypatch.chdir(tmp_path)  # no ./rayattr_runs here
    code, _, err = rayattr(capsys, "show", "answers")
    assert code == 2 and "rayattr_runs" in err and "RAYATTR_STORE" in err and "does not exist" in err


# ------------------------------------------------------------------ start-up, version, pipes

PROBE = textwrap.dedent("""
    import sys
    from rayattr.cli import main
    try:
        code = main(sys.argv[1:])
    except SystemExit as e:  # --version exits through argparse
        code = e.code
    heavy = [m for m in ("torch", "ray", "deepspeed") if m in sys.modules]
    print("HEAVY", heavy, "CODE", code, file=sys.stderr)
""")


@pytest.mark.parametrize("command", ["runs", "values", "show", "--version"])
def test_reading_commands_import_neither_torch_nor_ray(finished_run, command):
    store, uri = finished_run
    args = {"runs": ["runs", store], "values": ["values", uri], "show": ["show", uri], "--version": ["--version"]}
    out = subprocess.run([sys.executable, "-c", PROBE, *args[command]], capture_output=True, text=True,
                         timeout=120, env=env_here())
    assert "HEAVY [] CODE 0" in out.stderr, out.stderr[-2000:]


def test_version(capsys):
    from rayattr import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"rayattr {__version__}"


def test_output_into_a_closed_pipe_exits_quietly(finished_run):
    """`rayattr values RUN | head`: the reader is gone before the command writes."""
    p = subprocess.Popen([sys.executable, "-m", "rayattr.cli", "values", finished_run[1], "--by-phase"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env_here())
    p.stdout.close()  # closed long before the child has imported anything
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == ""  # 128 + SIGPIPE, as a shell reports `yes | head`


# ------------------------------------------------------------------ show and the recorded loss


def test_show_a_finished_run(capsys, finished_run):
    _, uri = finished_run
    code, out, _ = rayattr(capsys, "show", uri, "--format", "json")
    s = json.loads(out)
    assert code == 0 and s["status"] == "done" and s["run_id"] == "answers"
    assert s["training"]["num_steps"] == 20 and s["data"]["n_train"] == 160 and s["data"]["n_sources"] == 7
    assert s["capture"]["rank"] == 32 and s["embedding"]["segments"] == 2
    assert list(s["timings"]) == ["data", "train", "embed", "reduce"]
    loss = s["loss"]  # every step's global-batch mean loss, recorded by rank 0
    assert loss["steps"] == list(range(20)) and all(math.isfinite(v) and v > 0 for v in loss["loss"])
    assert loss["last"] < loss["first"]  # it learned something
    code, text, _ = rayattr(capsys, "show", uri)
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.strip() and not ln.startswith(" ")}
    assert code == 0 and "done" in lines["status"] and "20 steps" in lines["training"]
    assert f"{loss['first']:.4g} at step 0" in lines["loss"] and "timings" in lines


def test_show_a_run_that_is_still_training(capsys, tmp_path):
    run = Run.create(str(tmp_path), "busy", {"config": {"train": {"lr": 0.1}}})
    run.update_manifest(status="training")
    code, out, _ = rayattr(capsys, "show", run.uri)
    assert code == 0 and "training" in out and "no steps recorded yet" in out
    run.write_step_records([StepRecord(0, 0, 0.1, 0.05, [1, 2], ["a", "b"], [0, 1], loss=2.5),
                            StepRecord(1, 0, 0.1, 0.05, [3, 4], ["a", "b"], [0, 1])])  # loss not known
    code, out, _ = rayattr(capsys, "show", run.uri, "--format", "json")
    assert code == 0 and json.loads(out)["loss"]["loss"] == [2.5] and json.loads(out)["recorded_steps"] == 2


def test_step_record_loss_round_trip_and_check(tmp_path):
    run = Run.create(str(tmp_path), "r", {})
    run.write_step_records([StepRecord(0, 0, 0.1, 0.05, [1], ["a"], [0], loss=1.25)])
    assert [r.loss for r in run.step_records()] == [1.25]
    with pytest.raises(StoreError, match="loss must be finite"):
        run.write_step_records([StepRecord(1, 0, 0.1, 0.05, [1], ["a"], [0], loss=float("nan"))])


# ------------------------------------------------------------------ queries


def test_query_each_json_csv_and_source_filter(capsys, finished_run):
    _, uri = finished_run
    train = Run.open_uri(uri).read_table("data/train.parquet").to_pylist()
    a = next(r for r in train if r["source"] == "data")
    b = next(r for r in train if r["source"] == "net")
    code, out, err = rayattr(capsys, "query", uri, "--text", a["text"], "--text", b["text"], "--each",
                             "--k", "2", "--format", "json")
    answer = json.loads(out)
    assert code == 0 and answer["scored"] == "each" and [q["text"] for q in answer["queries"]] == [a["text"], b["text"]]
    assert [x["query"] for x in answer["answers"]] == [0, 1]
    assert all(len(x["helpful"]) == 2 for x in answer["answers"])
    assert "scoring the stored per-occurrence embeddings" in err  # progress goes to stderr, not stdout

    code, out, err = rayattr(capsys, "query", uri, "--text", a["text"], "--source", "net", "--source", "text",
                             "--k", "3", "--by-source", "--format", "csv", "--quiet")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and "scoring" not in err  # --quiet: no progress (notes about the texts stay)
    assert {r["list"] for r in rows} == {"helpful", "harmful", "source"}
    assert {r["source"] for r in rows} <= {"net", "text"} and all(r["query"] == "all" for r in rows)
    assert [r["rank"] for r in rows if r["list"] == "helpful"] == ["1", "2", "3"]

    code, _, err = rayattr(capsys, "query", uri, "--text", "x", "--source", "nope")
    assert code == 2 and "unknown source(s) ['nope']" in err and "corrupted" in err


def test_query_with_a_lone_surrogate_names_the_query(capsys, finished_run, tmp_path):
    _, uri = finished_run
    code, _, err = rayattr(capsys, "query", uri, "--text", "fine", "--text", "bad \udcff bytes")
    assert code == 2 and "query 1 (--text number 2)" in err and "lone surrogate" in err
    f = tmp_path / "q.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "half a pair \\ud800 here"}\n')
    code, _, err = rayattr(capsys, "query", uri, "--file", str(f))
    assert code == 2 and f"{f}:2" in err and "lone surrogate" in err and "Traceback" not in err


# ------------------------------------------------------------------ gc


def test_gc_dry_run_then_delete_keeps_the_answers(capsys, finished_run, tmp_path):
    store, uri = finished_run
    shutil.copytree(uri, tmp_path / "answers")
    run_dir = tmp_path / "answers"
    before = {p for p in run_dir.rglob("*") if p.is_file()}
    code, out, _ = rayattr(capsys, "gc", str(run_dir), "--dry-run")
    assert code == 0 and "dry run" in out and "grads/train" in out and "kB" in out
    assert {p for p in run_dir.rglob("*") if p.is_file()} == before  # nothing deleted

    code, out, _ = rayattr(capsys, "gc", str(run_dir))
    assert code == 0 and "deleted" in out
    assert not (run_dir / "grads/train").exists() and not (run_dir / "commits/train").exists()
    assert not (run_dir / "writers/train").exists() and (run_dir / "grads/embeddings").is_dir()
    for kept in ("run.json", "values/sources.parquet", "embeddings/sources.parquet", "weights/final.safetensors",
                 "data/train.parquet", "commits/steps"):
        assert (run_dir / kept).exists(), kept
    # the answers still come: values, a query from the kept embeddings, show with the loss
    code, out, _ = rayattr(capsys, "values", str(run_dir), "--format", "json")
    assert code == 0 and json.loads(out)[-1]["source"] == last_source(str(run_dir))
    code, out, _ = rayattr(capsys, "query", str(run_dir), "--text", "Return a new sorted list.", "--k", "2",
                           "--format", "json", "--quiet")
    assert code == 0 and len(json.loads(out)["helpful"]) == 2
    code, out, _ = rayattr(capsys, "show", str(run_dir), "--format", "json")
    s = json.loads(out)
    assert s["loss"]["steps"] == list(range(20)) and "grads/train" in s["gc"]["deleted"] and s["gc"]["bytes"] > 0
    code, out, _ = rayattr(capsys, "gc", str(run_dir))
    assert code == 0 and "nothing to delete" in out


def test_gc_refuses_a_run_that_is_not_finished(capsys, tmp_path):
    run = Run.create(str(tmp_path), "busy", {})
    run.update_manifest(status="embedding")
    run.write_bytes("checkpoints/latest.json", b"{}")
    for args in (["gc", run.uri], ["gc", run.uri, "--dry-run"]):
        code, _, err = rayattr(capsys, *args)
        assert code == 2 and "status 'embedding'" in err and "done or failed" in err
    assert (tmp_path / "busy/checkpoints/latest.json").exists()


# ------------------------------------------------------------------ Python API, job output


def test_python_tables_convert_to_pandas(finished_run):
    import rayattr

    frame = rayattr.open_run(finished_run[1]).sources().to_pandas()
    assert list(frame.columns)[:2] == ["source", "n_samples"] and frame["source"].iloc[-1] == last_source(finished_run[1])


def test_job_output_has_no_known_harmless_warnings(finished_run):
    out = (Path(finished_run[0]) / "job-output.txt").read_text()
    assert "95% interval (per sample)" in out  # it is the job's output
    for noise in ("all_gather_into_tensor", "untested optimizer", "Setting accelerator to CPU"):
        assert noise not in out, noise


QUIET = textwrap.dedent("""
    import logging, sys, warnings
    from rayattr.train.quiet import quiet_known_noise
    quiet_known_noise(expect_gpu=sys.argv[1] == "gpu")
    warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Use x.", FutureWarning)
    warnings.warn("some other deprecation", FutureWarning)
    log = logging.getLogger("DeepSpeed")
    log.addHandler(logging.StreamHandler(sys.stderr))
    log.warning("**** You are using ZeRO with an untested optimizer, proceed with caution *****")
    log.warning("Setting accelerator to CPU. If you have GPU or other accelerator, ...")
    log.warning("a warning nobody checked")
""")


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_only_the_known_harmless_warnings_are_filtered(device):
    err = subprocess.run([sys.executable, "-c", QUIET, device], capture_output=True, text=True, timeout=60,
                         env=env_here()).stderr
    assert "all_gather_into_tensor" not in err and "untested optimizer" not in err
    assert "some other deprecation" in err and "a warning nobody checked" in err
    # a GPU run that falls back to the CPU must still say so
    assert ("Setting accelerator to CPU" in err) == (device == "gpu")


# ------------------------------------------------------------------ report


def test_report_loss_curve_validation_set_and_honest_captions(finished_run, tmp_path):
    import pyarrow as pa

    from rayattr.report.html import write_report
    from rayattr.report.figures import HARMFUL, HELPFUL, phase_means

    run = Run.open_uri(finished_run[1])
    page = write_report(run, tmp_path).read_text()
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG") and "<h2>Training loss</h2>" in page
    assert "Values refer to the validation set: 32 texts, by source:" in page
    assert "typically shows high influence in the warm-up" not in page  # the old caption, not what it showed
    assert "The largest mean in size is" in page and "steps " in page
    assert (HELPFUL, HARMFUL) == ("#0072b2", "#d55e00")  # Okabe-Ito: no red/green pair

    phases = pa.table({"source": ["a", "a", "b", "b"], "phase": [0, 1, 0, 1], "step_start": [0, 5, 0, 5],
                       "step_end": [5, 10, 5, 10], "n_occurrences": [2, 4, 10, 10], "value": [1.0, 2.0, -5.0, 1.0]})
    sources, labels, grid = phase_means(phases)
    assert sources == ["a", "b"] and labels == ["0–5", "5–10"]  # a: 3/6 per occurrence beats b: -4/20
    assert grid.tolist() == [[0.5, 0.5], [-0.5, 0.1]]


def test_bare_rayattr_lists_the_commands(capsys):
    from rayattr.cli import main

    assert main([]) == 2
    out = capsys.readouterr().out
    for command in ("runs", "show", "values", "query", "validate", "report", "attribute"):
        assert command in out


def test_no_store_error_says_where_runs_are_looked_up(tmp_path, capsys):
    from rayattr.cli import main

    assert main(["runs", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "no store at" in err and "RAYATTR_STORE" in err
