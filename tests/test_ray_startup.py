"""Which Ray the job joins without RAY_ADDRESS: always a new local instance of its own, never
a cluster that `ray start` left on the machine (alive, or dead but still named in Ray's
ray_current_cluster file), and it says which one it joined. The live head: test_job.py,
beside its `ray start` cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from s3server import pick_ports

pytestmark = pytest.mark.slow  # each test starts Ray

ROOT = Path(__file__).resolve().parent.parent
STARTED = "ray: started a local Ray instance at "
# What the job (rayattr.pipeline.stages.prepare_data) and every rayattr command do first: connect,
# print the line, then run work on the Ray they got (a task here; the job is tested elsewhere).
# The task says which cluster its worker names in RAY_ADDRESS (runtime/cluster.setup_ray_worker).
CONNECT = ("import os, ray; from rayattr.runtime.cluster import connect; print(connect(), flush=True); "
           "address = ray.get(ray.remote(lambda: os.environ.get('RAY_ADDRESS')).remote()); "
           "print('task ran; its RAY_ADDRESS:', address)")


@pytest.fixture
def ray_tmpdir():
    """A Ray temp root of the test's own (RAY_TMPDIR): Ray looks for ray_current_cluster in
    $RAY_TMPDIR/ray/. Short, because Ray's unix socket paths must stay under ~107 characters."""
    d = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def run_connect(env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **env}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-c", CONNECT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_stale_cluster_file_does_not_hang(ray_tmpdir, tmp_path):
    """A head killed without `ray stop` leaves its address behind; nothing listens there."""
    dead = f"127.0.0.1:{pick_ports(1)[0]}"
    (ray_tmpdir / "ray").mkdir()
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(dead)
    out = run_connect({"RAY_TMPDIR": str(ray_tmpdir)})
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert STARTED in out.stdout and "task ran" in out.stdout
    assert "Connecting to existing Ray cluster" not in out.stdout + out.stderr
