"""rayattr.runtime.cluster.connect, with a stand-in for Ray: which cluster a job joins (the start-up
itself runs in test_ray_startup.py and test_job.py)."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import pytest

from rayattr.runtime.cluster import LOCAL_ENV, WORKER_SETUP, connect


@pytest.fixture
def ray(monkeypatch):
    calls = []
    fake = SimpleNamespace(calls=calls, initialized=False)

    def init(**kw):
        calls.append(kw)
        return SimpleNamespace(address_info={"gcs_address": "10.0.0.1:6379" if "address" in kw and
                                             kw["address"] != "local" else "127.0.0.1:61234"})

    fake.init = init
    fake.is_initialized = lambda: fake.initialized
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return fake


def test_without_an_address_a_local_instance_of_its_own(ray):
    # address="local": a bare ray.init() would attach to whatever `ray start` left here
    line = connect(log_to_driver=False)
    # logging_level: Ray's own INFO lines (the dashboard URL) would repeat the line connect returns
    assert ray.calls == [{"address": "local", "log_to_driver": False, "logging_level": logging.WARNING,
                          "runtime_env": {"env_vars": LOCAL_ENV, "worker_process_setup_hook": WORKER_SETUP}}]
    assert line.startswith("ray: started a local Ray instance at 127.0.0.1:61234")


def test_ray_address_joins_that_cluster_with_the_jobs_own_runtime_env(ray, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    line = connect()
    # Ray merges this runtime_env with the job's own (working_dir, env_vars)
    assert ray.calls == [{"address": "10.0.0.1:6379", "log_to_driver": True,
                          "runtime_env": {"worker_process_setup_hook": WORKER_SETUP}}]
    assert line == "ray: joined the cluster at 10.0.0.1:6379 (RAY_ADDRESS=10.0.0.1:6379)"


def test_library_code_logs_the_line_and_an_entry_point_shows_it(ray, capsys, monkeypatch):
    """connect() prints nothing itself (a user's program decides what it shows); an entry point's
    show_warnings shows the line as it is on stderr, and warnings with their level."""
    import io

    from rayattr.runtime.logs import show_warnings

    # as in a fresh process: no entry point's handler yet (an earlier test's CLI call added one)
    monkeypatch.setattr(logging.getLogger("rayattr"), "handlers", [])
    monkeypatch.setattr(logging.getLogger("rayattr.runtime.cluster"), "level", logging.NOTSET)
    connect()
    assert capsys.readouterr() == ("", "")
    stream = io.StringIO()
    show_warnings(stream)
    line = connect()
    logging.getLogger("rayattr.embed").info("not shown: an INFO record of another logger")
    logging.getLogger("rayattr.embed").warning("shown")
    assert stream.getvalue().splitlines() == [line, "warning: shown"]
    assert capsys.readouterr().out == ""


def test_once_per_process(ray, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    ray.initialized = True
    assert connect() == "ray: already initialised in this process" and ray.calls == []


def test_the_worker_setup_hook_names_the_cluster_and_drops_only_the_known_notice(capsys, monkeypatch):
    """Ray's worker_process_setup_hook names an importable function; in a worker it sets
    RAY_ADDRESS to the worker's own cluster, and drops Ray Train's "safe to ignore" overload
    warning and nothing else from that logger."""
    import importlib
    import os
    import types

    import ray

    from rayattr.runtime.cluster import RAY_WORKER_NOTICES

    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(gcs_address="10.0.0.2:6379"))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")  # another cluster's, inherited
    module, _, name = WORKER_SETUP.rpartition(".")
    getattr(importlib.import_module(module), name)()
    assert os.environ["RAY_ADDRESS"] == "10.0.0.2:6379"
    (logger_name,) = RAY_WORKER_NOTICES
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler := logging.StreamHandler(sys.stderr))
    try:
        logger.warning("Failed to send resource request for train-1. If this only happens transiently ...")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert "Failed to send resource request" not in err and "something else" in err
