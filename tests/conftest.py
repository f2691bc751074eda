"""Shared fixtures: a session-wide SeaweedFS S3 server and a store root on each backend.

    def test_x(store_root):      # runs twice: [local] and [s3]
        run = Run.create(store_root.uri, "r1", {}, options=store_root.options)

    def test_y(s3_store):        # the SeaweedS3 server itself (root_uri(), env, restart())

Two tiers: `python -m pytest -q` runs everything; `python -m pytest -q -m "not slow"` leaves
out the tests marked `slow`, those that start Ray, DeepSpeed, the S3 server, a job or a
cluster. A test is marked slow by what it uses (SLOW_FIXTURES, the [s3] store root) or by an
explicit `slow` mark where it starts one of them itself; a test that is not marked and starts
one anyway fails (see _guard) rather than quietly slowing the fast tier.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # make tests/s3server.py importable

from s3server import SeaweedS3  # noqa: E402

# Ray Train's controller polls its workers every 2 s by default, and a gang's start and end each
# wait for a poll: on the suite's 20-step gangs that was about 4 s of a 23 s training stage
# (small.yaml, 2026-12-03). The suite's jobs and in-process gangs poll every 0.5 s instead; the
# driver hands the variable to the controller (Ray Train propagates it). Production keeps
# Ray's default: on long runs the wait is noise, and a poll is one call per worker.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

from rayattr.store import StoreOptions  # noqa: E402


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 for the whole session (started on first use).

    Attributes: root_uri(name) -> fresh "s3://rayattr-test/<name>-<random>", storage_options
    (s3fs kwargs), env (AWS_* vars for subprocesses), endpoint_url, stop(), start(), restart().
    """
    # Never let botocore probe the EC2 metadata endpoint (only loopback is a valid target).
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@dataclass
class StoreRoot:
    """Where a test keeps its runs, on one backend."""

    backend: str  # "local" or "s3"
    uri: str  # root URI to pass to Run.create / list_runs
    options: StoreOptions  # connection options (credentials for S3)
    env: dict = field(default_factory=dict)  # AWS_* variables a subprocess needs (S3 only)
    server: SeaweedS3 | None = None  # the S3 server (S3 only)


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path) -> StoreRoot:
    """A fresh, empty store root: a local temp directory, then a unique prefix on SeaweedFS."""
    if request.param == "local":
        return StoreRoot("local", str(tmp_path / "store"), StoreOptions())
    server: SeaweedS3 = request.getfixturevalue("s3_store")
    opts = StoreOptions(storage_options=server.storage_options, connect_timeout_s=2.0,
                        max_attempts=3, backoff_s=0.1)
    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:40]
    return StoreRoot("s3", server.root_uri(name), opts, server.env, server)


@pytest.fixture(scope="session")
def local_ray():
    """Ray in the test process, started once for the session (2 CPUs, one thread per worker):
    each module that trains in-process shares it, and its start-up (seconds) is paid once.
    A test that leaves actors or placement groups behind would starve the next module; the
    pipeline tests check that a failed run frees every CPU."""
    import ray

    # Ray's workers find the driver's working directory, not pytest's rootdir-inserted tests/
    # folder: an actor class defined in a test module needs it on their path.
    tests = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": path}})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A real finished run, made once per session by the job script in its own process (its
    own local Ray): the quick built-in job with a projection large enough for per-sample
    answers (r = 32; at r = 8 a training text no longer finds itself first for most samples).
    test_job's cluster run repeats it (store/job-config.yaml) and must give the same values.
    Returns (store root, run URI)."""
    import subprocess

    import yaml

    root = Path(__file__).resolve().parent.parent
    settings = yaml.safe_load((root / "jobs/configs/small.yaml").read_text())
    settings["capture"]["rank"] = 32
    cfg = tmp_path_factory.mktemp("answers") / "answers.yaml"
    cfg.write_text(yaml.safe_dump(settings))
    store = tmp_path_factory.mktemp("answers-store")
    # the fault tests' variables set, their seams not installed: nothing may act on them (rank 1's
    # loss would turn NaN at step 1 if anything did; tests/test_job.py checks)
    faults = {f"{prefix}{suffix}": value for prefix in ("RAYATTR_", "RAYATTR_TEST_")
              for suffix, value in (("FAULT", "rank.nan:rank=1,step=1"), ("FAULT_DIR", str(store)))}
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **faults}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "jobs/pretrain_attr.py", "--config", str(cfg), "--store", str(store),
                          "--run-id", "answers", "--segments", "2", "--no-progress"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (store / "job-output.txt").write_text(out.stdout + out.stderr)  # read by the noise test
    (store / "job-config.yaml").write_text(cfg.read_text())
    return str(store), f"{store}/answers"


@dataclass
class Validated:
    """A validated copy of the finished run: its URI and what `rayattr validate` printed."""

    uri: str
    stdout: str


@pytest.fixture(scope="session")
def validated_run(finished_run, tmp_path_factory) -> Validated:
    """A copy of the finished run, validated once per session by `rayattr validate` in its own
    process (its own local Ray): 4 subsets of 20 %, every source, 3 occurrences, seed 1. The
    copy keeps the shared finished run unvalidated. test_validate reads its files (schema,
    reproduction, reuse) and test_report renders its trust box; a test that validates it again
    does so on a copy of its own, so every reader sees this validation's files."""
    import shutil

    copy = tmp_path_factory.mktemp("validated") / "trusted"
    shutil.copytree(finished_run[1], copy)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-m", "rayattr.cli", "validate", str(copy), "--subsets", "4",
                          "--fraction", "0.2", "--sources", "--occurrences", "3", "--seed", "1", "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return Validated(str(copy), out.stdout)


def last_source(run_uri: str) -> str:
    """The source the run's values/sources.parquet lists last (the lowest value): what a command
    that lists sources must list last. Which source that is on a 20-step run is noise."""
    from rayattr.store import Run

    return Run.open_uri(run_uri).read_table("values/sources.parquet")["source"].to_pylist()[-1]


# -- the slow tier ----------------------------------------------------------------------------

# Fixtures that start Ray, the S3 server or a job: a test that uses one, directly or through
# another fixture (item.fixturenames is the whole closure), is slow.
SLOW_FIXTURES = {"local_ray", "s3_store", "finished_run", "validated_run"}


# The session's shared runs (built once per pytest-xdist worker that asks for one): every module
# with a test that reads them runs on the same worker, so each is made once.
SHARED_RUNS = {"finished_run", "validated_run"}


# before xdist's own hook, which reads the groups to suffix each node id: after it, a module's
# tests were spread over both workers and its module-scoped runs made twice
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    shared_modules = {item.module.__name__ for item in items if SHARED_RUNS.intersection(item.fixturenames)}
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())) or params.get("store_root") == "s3":
            item.add_marker(pytest.mark.slow)
        # pyproject's `--dist loadgroup`: one worker per module (its module-scoped runs are made
        # once), and one for all the modules that share the session's runs
        module = item.module.__name__
        item.add_marker(pytest.mark.xdist_group("shared-runs" if module in shared_modules else module))


# What a fast test must not start. A command line that runs the job or an example, a DeepSpeed
# or torch launcher, the SeaweedFS server, the `ray` CLI, Ray's own daemons (ray.init starts
# them), or the rayattr commands that start Ray.
_SLOW_COMMAND = re.compile(r"pretrain_attr\.py|jobs/examples/|deepspeed\.launcher|torch\.distributed\.run|"
                           r"(^|/)(torchrun|weed|gcs_server|raylet|ray)( |$)|"
                           r"rayattr(\.cli)? (train|validate|attribute)( |$)")


class SlowInFastTest(AssertionError):
    pass


@contextmanager
def _guard(item):
    """While a test that is not marked slow sets up and runs: starting a process group
    (DeepSpeed's engine, a rank) or one of the commands above fails it, naming the mark."""
    if item.get_closest_marker("slow"):
        yield
        return
    import torch.distributed

    def refuse(what):
        raise SlowInFastTest(f"{item.nodeid} starts {what}: mark it @pytest.mark.slow "
                             "(or use a fixture in tests/conftest.py SLOW_FIXTURES)")

    popen_init = subprocess.Popen.__init__
    init_group = torch.distributed.init_process_group

    def checked_popen(self, args, *a, **kw):
        line = args if isinstance(args, str) else shlex.join(map(os.fspath, args))
        if _SLOW_COMMAND.search(line):
            refuse(repr(line[:200]))
        popen_init(self, args, *a, **kw)

    def checked_group(*a, **kw):
        refuse("a torch process group")

    subprocess.Popen.__init__ = checked_popen
    torch.distributed.init_process_group = checked_group
    try:
        yield
    finally:
        subprocess.Popen.__init__ = popen_init
        torch.distributed.init_process_group = init_group


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _guard(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _guard(item):
        yield
