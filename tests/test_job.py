"""The job end to end: `python jobs/pretrain_attr.py` on one node, and `ray job submit` to a
two-node cluster (`ray start --head` + `ray start --address`) with its store on SeaweedFS S3
and its data stage on Ray Data tasks: both runs must give the same token files and values."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from raycluster import LocalRayCluster
from rayattr.store import Run, StoreOptions

ROOT = Path(__file__).resolve().parent.parent
# the built-in job on its quick config (conftest.finished_run's): 2 epochs of 10 steps
ARGS = ["--config", "jobs/configs/small.yaml", "--segments", "2", "--no-progress"]
STEPS, BATCH = 20, 16


@pytest.fixture(scope="module")
def single_node(finished_run) -> Run:
    """The job as a user runs it on one machine (no Ray address: it starts a local Ray), on the
    quick config: the session's shared finished run."""
    store, uri = finished_run
    assert f"run: {uri}" in (Path(store) / "job-output.txt").read_text()
    return Run.open_uri(uri)


def test_the_job_counts_truncated_texts_and_ignores_the_fault_variables(single_node, finished_run):
    """The quick config's texts are all longer than data.seq_len = 32 tokens: the run counts them
    in run.json n_truncated (which rows count: tests/test_bad_input_more.py) and the job says so.
    The run was made with the fault tests' variables set: a real run ignores them."""
    printed = (Path(finished_run[0]) / "job-output.txt").read_text()
    assert single_node.manifest["n_truncated"] == 160
    assert "note: 160 of the 160 training texts the run trains on are longer than data.seq_len = 32 tokens" in printed
    assert "loss is nan" not in printed and not list(Path(finished_run[0]).glob("fault-fired-*"))
    assert np.isfinite([r.loss for r in single_node.step_records()]).all()


@pytest.fixture(scope="module")
def on_cluster(finished_run, tmp_path_factory) -> list[str]:
    """The single-node run's config and arguments with the data stage as Ray Data tasks over
    the cluster (the built-in corpus's stage runs in the driver by default): the single-node
    run's stage ran in its driver, so equal token files say the two engines agree."""
    settings = yaml.safe_load((Path(finished_run[0]) / "job-config.yaml").read_text())
    settings.setdefault("data", {})["stage"] = "cluster"
    path = tmp_path_factory.mktemp("config") / "on-cluster.yaml"
    path.write_text(yaml.safe_dump(settings))
    return ["--config", str(path), *ARGS[2:]]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalRayCluster(tmp_path_factory.mktemp("ray"), nodes=2).start()
    yield c
    c.stop()


RAY_LINE = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+\w+ cli\.py|^\s*$|"
                      r"^(Next steps|  Query|  Request|  \$ ray|\s+ray job)")


def assert_summary(stdout: str, last: str) -> None:
    """The job's summary: stage times, each source with its interval (`last` listed last),
    which sources stand apart, and the commands that answer questions, last on stdout."""
    assert "stage wall times:" in stdout and "95% interval (per sample)" in stdout
    rows = [ln.split()[0] for ln in stdout.splitlines() if ln.rstrip().endswith("]")]
    assert rows and rows[-1] == last, stdout[-2000:]
    assert "stands apart" in stdout or "no source stands apart" in stdout
    # the job's last line names the next commands; after it only Ray's own lines may come (a
    # rank's forwarded "(RayTrainWorker pid=...)" line flushed late, `ray job submit`'s banner)
    lines = stdout.rstrip().splitlines()
    last = max(i for i, ln in enumerate(lines) if ln.startswith("next: rayattr values "))
    assert all(RAY_LINE.search(ln) for ln in lines[last + 1:]), lines[last + 1:]


def check_outputs(run: Run, reference: Run, stdout: str) -> None:
    m = run.manifest
    assert m["status"] == "done" and m["num_steps"] == STEPS and m["segments"] == 2
    for rel in ("values/samples.parquet", "values/sources.parquet", "values/phases.parquet",
                "embeddings/sources.parquet", "data/train.parquet", "data/validation.parquet",
                "weights/initial.safetensors", "weights/final.safetensors"):
        assert run.exists(rel), rel
    samples = run.read_table("values/samples.parquet")
    assert samples.column_names == ["sample_id", "source", "step", "epoch", "value", "value_se"]
    assert samples.num_rows == STEPS * BATCH
    # the same token shards, bit for bit, and the same values as the single-node run, whatever
    # the cluster and the store
    files = sorted(f for f in reference.list("data/tokens") if f.endswith(".parquet"))
    assert files and sorted(f for f in run.list("data/tokens") if f.endswith(".parquet")) == files
    assert all(run.read_bytes(f"data/tokens/{f}") == reference.read_bytes(f"data/tokens/{f}") for f in files)
    np.testing.assert_array_equal(samples["value"].to_numpy(),
                                  reference.read_table("values/samples.parquet")["value"].to_numpy())
    sources = run.read_table("values/sources.parquet").to_pylist()
    # the order the summary prints is the stored one (on 20 steps the sources' intervals overlap:
    # which comes last is noise, and the summary says no source stands apart)
    assert_summary(stdout, sources[-1]["source"])


@pytest.mark.slow
def test_job_submit_multinode_s3(cluster, single_node, on_cluster, s3_store):
    """Ranks one per node (STRICT_SPREAD), segments spread, store on S3 from the AWS env."""
    root = s3_store.root_uri("job")
    out = cluster.submit(["python", "jobs/pretrain_attr.py", "--store", root, "--run-id", "multi",
                          "--placement", "STRICT_SPREAD", *on_cluster], env=s3_store.env, working_dir=str(ROOT))
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "succeeded" in out.stdout + out.stderr
    run = Run.open(root, "multi", options=StoreOptions(storage_options=s3_store.storage_options))
    assert run.manifest["data"]["token_nodes"] == 2  # the data stage's tasks ran on both nodes
    assert sorted(run.manifest["rank_nodes"]) == cluster.ips  # one rank on each node
    assert len(set(run.manifest["segment_nodes"])) == 2
    check_outputs(run, single_node, out.stdout)
    # credentials stay out of the run
    assert s3_store.secret_key not in run.read_bytes("run.json").decode()


@pytest.mark.slow
def test_validate_through_job_submit(cluster, single_node, tmp_path):
    """`rayattr validate` as a Ray job on the two-node cluster: its retraining gangs run there,
    and the nothing-removed retrain reproduces the single-node run's final weights exactly."""
    import json
    import shutil

    shutil.copytree(single_node.uri, tmp_path / "store" / "answers")  # the shared run stays unvalidated
    uri = str(tmp_path / "store" / "answers")
    # no working_dir: the installed `rayattr` command runs. (Both "nodes" of this one-machine
    # cluster share one Ray temp dir, and one node's runtime-env clean-up can delete a shipped
    # working_dir under the other's long-running driver.)
    # two source removals and the baseline: the gangs on the cluster (occurrence removals and
    # subsets are retrained the same way, tests/test_validate.py)
    out = cluster.submit(["python", "-m", "rayattr.cli", "validate", uri, "--sources", "corrupted", "text",
                          "--no-progress", "--format", "json"], working_dir=None)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "ray: joined the cluster" in out.stdout + out.stderr
    run = Run.open(str(tmp_path / "store"), "answers")
    summary = json.loads(run.read_bytes("validation/summary.json"))
    # --format json prints exactly the summary it wrote (amid `ray job submit`'s own lines)
    start = out.stdout.index("\n{") + 1
    printed, _ = json.JSONDecoder().raw_decode(out.stdout[start:])
    assert printed == summary
    assert summary["baseline_max_abs_diff"] == 0.0 and summary["n_sources"] == 2 and summary["n_occurrences"] == 0
    sources = run.read_table("validation/sources.parquet").to_pylist()
    assert {r["source"] for r in sources} == {"corrupted", "text"} and all(r["actual"] != 0 for r in sources)


@pytest.mark.slow
def test_live_head_from_ray_start_is_left_alone(cluster):
    """This module's `ray start` head is running and named in Ray's ray_current_cluster file:
    a process without RAY_ADDRESS still starts its own local instance and says so (it once
    attached to whatever `ray start` left on the machine). After the cluster's jobs: the new
    instance's session shares the cluster's temp dir."""
    import shutil
    import tempfile

    from test_ray_startup import STARTED, run_connect

    tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths stay < 107 characters
    try:
        (tmp / "ray").symlink_to(cluster.temp_dir)  # RAY_TMPDIR/ray: where Ray looks for the file
        assert (tmp / "ray" / "ray_current_cluster").read_text().strip() == cluster.gcs_address
        # the head's token too, so that joining it would have worked: the process must not
        out = run_connect({"RAY_TMPDIR": str(tmp), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster.token})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert cluster.gcs_address not in out.stdout + out.stderr
    assert STARTED in out.stdout and "task ran" in out.stdout
    # its workers name the new instance, where Ray Train's placement-group cleaner must look
    started = out.stdout.split(STARTED)[1].split()[0]
    assert f"its RAY_ADDRESS: {started}" in out.stdout


# Lines that carry a log level: Python's and DeepSpeed's (WARNING, [WARNING]), Ray's C++ logs
# ("12:00:00,000 E 123 456]"), tracebacks. The job's own notes print as "warning: ..." / "note: ...".
LEVEL = re.compile(r"\b(WARNING|ERROR|CRITICAL|FATAL)\b|\d\d:\d\d:\d\d,\d{3} [WEF] \d+ \d+\]|^Traceback")


def level_lines(output: str) -> list[str]:
    """The lines at WARNING level or above (each process's prefix and colours taken off)."""
    bodies = (re.sub(r"^\(\w+ pid=\d+(, ip=[\d.]+)?\)\s?", "", re.sub(r"\x1b\[[0-9;]*m", "", raw))
              for raw in re.split(r"[\r\n]+", output))
    return [b for b in bodies if LEVEL.search(b)]


def default_job(store: Path, run_id: str, *args: str, progress: bool = False) -> tuple[Run, str]:
    """The job run as a user runs it; its stderr holds no line at WARNING or ERROR level (Ray's
    token-auth notice, Ray Train's PreemptionWatcher and per-report lines, DeepSpeed's scheduler
    warning are gone), and with progress the training bar's first estimate is sane. Returns the
    run and everything the job printed."""
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "jobs/pretrain_attr.py", "--store", str(store), "--run-id", run_id,
                          *([] if progress else ["--no-progress"]), *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    run = Run.open(str(store), run_id)
    assert_summary(out.stdout, run.read_table("values/sources.parquet")["source"].to_pylist()[-1])
    assert level_lines(out.stdout + "\n" + out.stderr) == [], (out.stdout + out.stderr)[-3000:]
    assert "Reporting training result" not in out.stdout + out.stderr
    assert "truncated" not in out.stdout  # the built-in texts fit data.seq_len
    if progress:  # the estimate leaves the ranks' start-up out: not the 42:23 of a bar started before it
        first = re.search(r"train:\s+\d+%\|[^|]*\| *[1-9]\d*/\d+ \[[\d:]+<(\d+):(\d+)", out.stderr)
        assert first and int(first.group(1)) < 10, out.stderr[:3000]
    return run, out.stdout + out.stderr


@pytest.mark.slow
def test_default_job_says_how_far_its_values_hold(tmp_path):
    """README's first command: no arguments but a store: the built-in corpus, AdamW, 2 ranks,
    192 steps. Whether the deliberately corrupted source comes last is the values' fidelity,
    which the default run does not establish (BENCHMARKS.md: its recursion amplifies in the
    warm-up, η·λ_max(P·H) well above 2 at seed 0, and the ranking moves with the batch order).
    What the job must do is say so: the step that amplifies is named, and the summary says
    whether any source stands apart."""
    run, printed = default_job(tmp_path, "seed0", progress=True)
    m = run.manifest
    assert m["num_steps"] == 192 and m["n_sources"] == 7
    assert {r.optimizer for r in run.step_records()} == {"adamw"}
    assert m["eta_lambda_preconditioned"] is True and m["stability_edge"] == pytest.approx(38.0)
    if m["max_eta_lambda"] > 2:
        assert f"η·λ_max(P H) = {m['max_eta_lambda']:.3g} at step {m['max_eta_lambda_step']}" in printed
        assert printed.count("η·λ_max(P H) =") == 1  # once, from the driver
        assert "not the loss's Hessian" in printed  # whose H the figure is
    else:
        assert "η·λ_max" not in printed
    clipped = m["clipped_steps"]  # DeepSpeed clips at 1.0: the job says where the values hold κ
    assert printed.count(f"gradient clipping acted at {clipped} of 192 steps") == (1 if clipped else 0)


@pytest.mark.slow
def test_job_unreachable_store_fails_before_ray_starts(tmp_path):
    """A store that cannot be reached is reported by name, after bounded retries, and no Ray
    cluster is started for a run that could not be written anywhere."""
    from s3server import pick_ports

    closed = pick_ports(1)[0]  # free, so nothing listens there
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "secret-value", "AWS_EC2_METADATA_DISABLED": "true"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "jobs/pretrain_attr.py", "--config", "jobs/configs/small.yaml",
                          "--store", "s3://rayattr-missing/runs", "--no-progress"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"unreachable at http://127.0.0.1:{closed}" in out.stderr
    assert "started a local ray" not in (out.stdout + out.stderr).lower()  # Ray's INFO line or the job's


def job_module():
    """jobs/pretrain_attr.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_attr_job", ROOT / "jobs" / "pretrain_attr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, env, store, noted", [
    ([], None, "./rayattr_runs", False),                                    # built-in default
    ([], "/srv/runs", "/srv/runs", False),                                  # the environment, as the CLI
    (["--store", "/cli/runs"], "/srv/runs", "/cli/runs", False),            # the flag wins
    (["--config", "jobs/configs/gpu_cluster.yaml"], None, "s3://my-attribution-bucket/runs", False),
    (["--config", "jobs/configs/gpu_cluster.yaml"], "/srv/runs", "/srv/runs", True),  # said on stderr
    (["--config", "jobs/configs/default.yaml"], "/srv/runs", "/srv/runs", True),
])
def test_job_store_defaults_to_rayattr_store(monkeypatch, argv, env, store, noted):
    """The job writes where `rayattr RUN_ID` looks: --store, else $RAYATTR_STORE, else the config."""
    from rayattr.store import default_store

    job = job_module()
    if env is None:
        monkeypatch.delenv("RAYATTR_STORE", raising=False)
    else:
        monkeypatch.setenv("RAYATTR_STORE", env)
    monkeypatch.chdir(ROOT)
    cfg, note = job.resolve_config(job.parse_args([*argv, "--run-id", "x", "--ranks", "3"]))
    assert cfg.store.uri == store
    assert (cfg.run_id, cfg.train.ranks) == ("x", 3)  # the other settings still apply
    assert (note is not None) == noted
    if noted:
        assert env in note and argv[1] in note
    if "--store" not in argv and "--config" not in argv:
        assert cfg.store.uri == default_store()  # the same answer as the CLI's


def test_rayattr_train_runs_the_job(capsys):
    """`rayattr train [CONFIG]` is the job's own command line (no checkout needed)."""
    from rayattr.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0 and "usage: rayattr train" in capsys.readouterr().out
    job = job_module()
    assert job.parse_args(["jobs/configs/small.yaml"]).config == "jobs/configs/small.yaml"
    assert job.parse_args(["--config", "jobs/configs/small.yaml"]).config == "jobs/configs/small.yaml"
    with pytest.raises(SystemExit):
        job.parse_args(["a.yaml", "--config", "b.yaml"])
    assert "two configs given" in capsys.readouterr().err
