"""Fault injection lives in the tests: the package has only empty seams (rayattr.hooks), and no
environment variable in a user's environment can kill a worker or turn the loss NaN."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import rayattr
from rayattr import hooks

ROOT = Path(__file__).resolve().parent.parent
# every name the fault machinery ever answered to, old and new
FAULT_ENV = {"RAYATTR_FAULT": "rank.nan:rank=1,step=1", "RAYATTR_TEST_FAULT": "rank.nan:rank=1,step=1"}


def test_the_package_has_no_fault_injection():
    package = Path(rayattr.__file__).parent
    assert not (package / "faults.py").exists()  # moved to tests/faults.py
    for path in package.rglob("*.py"):
        text = path.read_text()
        assert "os._exit" not in text and "RAYATTR_FAULT" not in text and "RAYATTR_TEST" not in text, path


def test_seams_are_empty_in_production():
    code = ("import pkgutil, importlib, rayattr\n"
            "from rayattr import hooks\n"
            "for m in pkgutil.walk_packages(rayattr.__path__, 'rayattr.'):\n"
            "    importlib.import_module(m.name)\n"
            "assert hooks.registered() == {}, hooks.registered()\n")
    env = {**os.environ, **FAULT_ENV, "RAYATTR_FAULT_DIR": "/nonexistent"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_hooks_call_and_pass():
    seen = []
    try:
        hooks.register("p", lambda **at: seen.append(at))
        hooks.register("v", lambda value, **at: value * at["k"])
        hooks.register("v", lambda value, **at: value + 1)
        hooks.call("p", step=3)
        assert seen == [{"step": 3}]
        assert hooks.passed("v", 5, k=2) == 11 and hooks.passed("none", 5) == 5
        assert hooks.registered() == {"p": 1, "v": 2}
    finally:
        hooks.clear()
    assert hooks.registered() == {}


@pytest.mark.slow
def test_fault_variables_do_not_reach_a_real_run(tmp_path):
    """The quick job with the old (and the test) fault variable set but no test seams
    installed: it trains to the end. Before, RAYATTR_FAULT made rank 1's loss NaN."""
    env = {**os.environ, **FAULT_ENV, "RAYATTR_FAULT_DIR": str(tmp_path), "RAYATTR_TEST_FAULT_DIR": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "jobs/pretrain_attr.py", "--config", "jobs/configs/small.yaml",
                          "--store", str(tmp_path / "store"), "--run-id", "r", "--steps", "3", "--segments", "1",
                          "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loss is nan" not in out.stderr
    assert not list(tmp_path.glob("fault-fired-*"))


@pytest.mark.parametrize("point", ["rank.step", "rank.loss", "driver.train", "segment.compute"])
def test_every_seam_is_in_the_code(point):
    """The seams the fault tests use stay where the faults belong."""
    where = {"rank.step": "train/worker.py", "rank.loss": "train/worker.py",
             "driver.train": "train/trainer.py", "segment.compute": "embed/segment.py"}[point]
    assert f'"{point}"' in (Path(rayattr.__file__).parent / where).read_text()
