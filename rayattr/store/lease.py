"""One driver per run: a lease object, created with the store's conditional create.

A driver (`rayattr run`, `--resume`, `rayattr attribute`, `rayattr validate`) compacts the
commit index and starts takeover writers; two at once on one run would undo each other. So a
driver holds the run's lease while it works:

    driver/lease-<generation>     {"owner", "host", "pid", "started", "renewed", "ttl", "released"}

  * acquire: the lease of the largest generation decides. None, released, or not renewed for
    its ttl (expired): create generation + 1 with the conditional create (If-None-Match: * on
    S3, a hard link locally), so of two drivers taking over at once exactly one wins. Live:
    DriverLeaseError naming its holder's host, pid and start time.
  * renew: a daemon thread rewrites the holder's own generation every ttl / 3 seconds (nobody
    else ever writes it). A holder that finds a later generation has lost the lease (it stalled
    past its ttl): `check()` then raises, and it renews no more.
  * release: the holder marks its generation released; the next driver need not wait. A
    holder on the same host whose process is gone (a killed driver) counts as released.

Expiry compares the holder's last renewal with the contender's clock: hosts whose clocks
differ by more than a fraction of the ttl (default 60 s) can take a live lease over early.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Iterator

from .errors import StoreError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .run import Run

LEASE_DIR = "driver"
DEFAULT_TTL_S = 60.0
_NAME = re.compile(r"^lease-(\d+)$")


class DriverLeaseError(StoreError):
    """Another driver holds the run's lease (or this one lost it): attributes holder, host,
    pid and started (seconds since the epoch) name it."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        holder = holder or {}
        self.holder = holder
        self.host, self.pid, self.started = holder.get("host"), holder.get("pid"), holder.get("started")


def lease_path(generation: int) -> str:
    return f"{LEASE_DIR}/lease-{generation:08d}"


def _alive(holder: dict) -> bool:
    """False only when the holder ran on this host and its process is gone (a driver killed
    before it could release): its lease is dead at once, not after its ttl. On another host
    only the ttl can tell."""
    if holder.get("host") != socket.gethostname() or not holder.get("pid"):
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _since(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t or 0)) + " UTC"


class DriverLease:
    """The lease of one run for this driver; use it as a context manager (acquire, release)."""

    def __init__(self, run: "Run", ttl_s: float = DEFAULT_TTL_S):
        if ttl_s <= 0:
            raise StoreError(f"lease ttl must be positive, got {ttl_s}")
        self.run = run
        self.ttl_s = float(ttl_s)
        self.owner = uuid.uuid4().hex[:12]
        self.generation: int | None = None
        self.lost = False
        self._info: dict = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def _storage(self):
        return self.run._storage

    def _current(self) -> tuple[int, dict | None]:
        gens = []
        for rel in self._storage.find(LEASE_DIR):
            m = _NAME.match(posixpath.basename(rel))
            if m:
                gens.append(int(m[1]))
        if not gens:
            return 0, None
        g = max(gens)
        try:
            return g, json.loads(self._storage.get_bytes(lease_path(g)))
        except FileNotFoundError:
            return g, None

    def acquire(self) -> "DriverLease":
        for _ in range(8):
            g, holder = self._current()
            now = time.time()
            if (holder and not holder.get("released") and _alive(holder)
                    and now - float(holder.get("renewed", 0)) <= float(holder.get("ttl", 0))):
                raise DriverLeaseError(
                    f"run '{self.run.run_id}' is driven by another driver: pid {holder.get('pid')} on "
                    f"{holder.get('host')}, started {_since(holder.get('started'))} (lease renewed "
                    f"{now - float(holder.get('renewed', 0)):.0f} s ago, expires after {holder.get('ttl')} s "
                    "without renewal); wait for it to finish, or stop it", holder)
            info = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                    "started": now, "renewed": now, "ttl": self.ttl_s, "released": False,
                    "generation": g + 1}
            try:
                self._storage.create_bytes(lease_path(g + 1), json.dumps(info).encode())
            except FileExistsError:
                continue  # another driver took it at the same moment: look again
            self.generation, self._info = g + 1, info
            stale = [lease_path(k) for k in range(max(1, g - 1), g) if k]  # keep the last two
            with contextlib.suppress(FileNotFoundError, StoreError):
                self._storage.remove([r for r in stale if self._storage.exists(r)])
            self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                            name=f"rayattr-lease-{self.run.run_id}")
            self._thread.start()
            return self
        raise DriverLeaseError(f"run '{self.run.run_id}': could not take the driver lease "
                               "(other drivers kept taking it)")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except Exception:  # noqa: BLE001 - a blip: the next renewal tries again, within the ttl
                log.warning("renewing the driver lease of %s failed; retrying", self.run.uri, exc_info=True)
            if self.lost:
                return

    def renew(self) -> None:
        with self._lock:
            if self.generation is None or self.lost:
                return
            g, _ = self._current()
            if g != self.generation:
                self.lost = True
                return
            self._info["renewed"] = time.time()
            self._storage.put_bytes(lease_path(self.generation), json.dumps(self._info).encode())

    def check(self) -> None:
        """DriverLeaseError if this driver no longer holds the lease."""
        if self.generation is None:
            raise DriverLeaseError(f"run '{self.run.run_id}': the driver lease is not held")
        if self.lost:
            raise DriverLeaseError(f"run '{self.run.run_id}': this driver lost its lease (it was not "
                                   "renewed in time and another driver took the run over)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self.generation is None or self.lost:
                return
            g, _ = self._current()
            if g == self.generation:
                self._info["released"] = True
                self._storage.put_bytes(lease_path(self.generation), json.dumps(self._info).encode())
            self.generation = None

    def __enter__(self) -> "DriverLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: dict[str, DriverLease] = {}  # run URI -> the lease this process holds on it
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def driver_lease(run: "Run", ttl_s: float = DEFAULT_TTL_S) -> Iterator[DriverLease]:
    """Hold `run`'s driver lease for the block; re-entrant within a process (run -> attribute)."""
    with _HELD_LOCK:
        held = _HELD.get(run.uri)
    if held is not None and not held.lost:
        run._lease = held
        yield held
        return
    lease = DriverLease(run, ttl_s).acquire()
    with _HELD_LOCK:
        _HELD[run.uri] = lease
    run._lease = lease
    try:
        yield lease
    finally:
        with _HELD_LOCK:
            _HELD.pop(run.uri, None)
        run._lease = None
        lease.release()
