"""One driver per run: the driver lease (store/lease.py)."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch

from rayattr.errors import RayattrError
from rayattr.store import GradientWriter, Run
from rayattr.store.lease import DriverLease, DriverLeaseError, driver_lease


@pytest.fixture
def run(store_root):  # [local] in the fast tier, [s3] in the slow one
    return Run.create(store_root.uri, "r", {"layers": {"l": 4}}, options=store_root.options)


def test_a_second_concurrent_driver_is_refused_naming_the_holder(run):
    with DriverLease(run, ttl_s=30):
        other = Run.open_uri(run.uri, options=run.options, mode="record")
        with pytest.raises(DriverLeaseError, match=rf"pid {os.getpid()} on {socket.gethostname()}, started") as err:
            with driver_lease(other):
                pass
        assert isinstance(err.value, RayattrError)
        assert (err.value.host, err.value.pid) == (socket.gethostname(), os.getpid())
        assert time.time() - err.value.started < 60


def test_the_driver_entry_points_take_the_lease_before_any_work(run):
    from rayattr.pipeline.stages import attribute_recorded, complete_run
    from rayattr.validate.validation import validate_run

    run.update_manifest(status="done", config={})
    with DriverLease(run, ttl_s=30):
        for call in (lambda: attribute_recorded(None, run), lambda: complete_run(None, run),
                     lambda: validate_run(run, subsets=1)):
            with pytest.raises(DriverLeaseError, match="driven by another driver"):
                call()


def test_a_live_driver_keeps_its_lease_past_its_ttl(run):
    with DriverLease(run, ttl_s=0.3):
        time.sleep(0.8)  # renewed every 0.1 s
        with pytest.raises(DriverLeaseError):
            DriverLease(run, ttl_s=0.3).acquire()


def test_an_expired_lease_is_taken_over_and_its_holder_refused(run):
    dead = DriverLease(run, ttl_s=0.3).acquire()
    dead._stop.set()  # the driver hangs: no more renewals
    dead._thread.join()
    with pytest.raises(DriverLeaseError):
        DriverLease(run, ttl_s=0.3).acquire()
    time.sleep(0.5)
    with driver_lease(run, ttl_s=30) as new:
        assert new.generation == dead.generation + 1
        dead.renew()  # it wakes up: it lost the lease, and writes nothing more
        assert dead.lost
        run._lease = dead
        with pytest.raises(DriverLeaseError, match="lost its lease"):
            run.update_manifest(status="x")
        run._lease = new


def test_a_released_lease_lets_the_next_driver_in_at_once(run):
    with DriverLease(run, ttl_s=30):
        pass
    with driver_lease(run):
        with driver_lease(run) as inner:  # re-entrant in one process: run -> attribute
            assert not inner.lost


def test_gc_is_refused_while_a_driver_holds_the_run(run):
    from rayattr.store.gc import collect, collectable

    run.update_manifest(status="failed")  # a failed run that another driver is resuming
    with GradientWriter(run, 0, {"l": 4}) as w:
        w.write_step(0, [0], ["s"], {"l": torch.zeros(1, 4)})
    garbage = collectable(run)
    assert garbage
    with DriverLease(run, ttl_s=30):
        with pytest.raises(DriverLeaseError):
            collect(run, garbage)
        assert shards(run)
    collect(run, garbage)
    assert not shards(run)


def shards(run):  # the gradient shards themselves (S3 may keep an empty directory's marker)
    return [p for p in run._storage.find("grads/train") if p.endswith(".arrow")]


def test_a_lease_whose_holder_process_is_gone_is_taken_at_once(run):
    """A driver killed before it could release (same host, its pid gone) does not hold the run
    for its ttl: the next driver takes over at once; a live holder still refuses it."""
    import json
    import subprocess
    import sys

    from rayattr.store.lease import lease_path

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    now = time.time()
    holder = {"owner": "gone", "host": socket.gethostname(), "pid": pid, "started": now, "renewed": now,
              "ttl": 3600.0, "released": False, "generation": 1}
    run._storage.put_bytes(lease_path(1), json.dumps(holder).encode())
    with DriverLease(run, ttl_s=30) as lease:
        assert lease.generation == 2
    live = {**holder, "pid": os.getppid(), "generation": 3}  # a live process on this host
    run._storage.put_bytes(lease_path(3), json.dumps(live).encode())
    with pytest.raises(DriverLeaseError):
        DriverLease(run, ttl_s=30).acquire()
