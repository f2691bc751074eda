"""Writer registrations (writers/<kind>/rNNNN.eNNNNNNNN.json): which writers are still open.

A GradientWriter registers itself "open" when it starts and "closed" when it ends cleanly; a
writer that failed stays "open", so readers keep waiting for its rank. The end of a recording
is the moment every registration of its kinds is closed (Recorder.finish waits for it), and
`rayattr attribute` refuses a run whose writers are still open (with `--wait`, after waiting).

Each writer registers under its own epoch (store/epochs.py) and a rank's state is its latest
epoch's registration: a zombie writer (a restarted rank's predecessor) that writes its
registration late only changes its own, older one, so it can neither mark the rank closed
while its successor is open nor open again after it closed.
"""

from __future__ import annotations

import json
import posixpath
import re
import time
from typing import TYPE_CHECKING, Iterable, Sequence

from . import epochs, layout
from .errors import StoreError
from .storage import Storage

if TYPE_CHECKING:
    from .run import Run

_NAME = re.compile(r"^r(\d+)\.e(\d+)\.json$")  # r<rank>.e<epoch>.json

# kinds a training run records: their writers must all be closed before attribution
TRAINING_KINDS = ("train", layout.CURVATURE_KIND, layout.UPDATE_KIND, layout.V_RESPONSE_KIND,
                  layout.CURVATURE_UPDATE_KIND)


class OpenWritersError(StoreError):
    """Writers of a run are still open (or a rank has not registered one): its recording has
    not ended, so what it holds is not yet complete."""

    def __init__(self, message: str, writers: list[dict]):
        super().__init__(message)
        self.writers = writers


def describe_writer(reg: dict | None) -> str:
    """A writer registration as an error names it: id, rank, kind, pid, host and since when."""
    if not reg:
        return "(no registration)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(reg.get("time", 0)))
    return (f"{reg.get('writer')} of rank {reg.get('rank')} ({reg.get('kind')}; pid {reg.get('pid')} on "
            f"{reg.get('host')}, since {since} UTC)")


def current(storage: Storage, kind: str, rank: int | None = None) -> dict[int, dict]:
    """rank -> the registration that decides the rank's state (of one rank when `rank` is
    given): its latest writer epoch's. A rank whose latest claimed epoch has not registered
    yet (its writer is starting, or died starting) counts as open, described by the claim.
    The registrations are listed before the claims: a writer that claims and registers in
    between is then seen as starting, never missed. One registration is read per rank."""
    latest: dict[int, tuple[int, str]] = {}  # rank -> (epoch in the name), path
    for rel in storage.find(layout.writer_dir(kind)):
        m = _NAME.match(posixpath.basename(rel))
        if m and (rank is None or int(m[1]) == rank):
            e = int(m[2])
            if e >= latest.get(int(m[1]), (-1, ""))[0]:
                latest[int(m[1])] = (e, rel)
    claimed = epochs.latest(storage, kind)
    rels = [rel for _, rel in latest.values()]
    out: dict[int, dict] = {}
    for rel, raw in zip(rels, storage.get_many(rels)):
        try:
            reg = json.loads(raw)
            out[int(reg["rank"])] = reg
        except (ValueError, KeyError, TypeError):
            raise StoreError(f"unreadable writer registration {storage.uri}/{rel}") from None
    for r, epoch in claimed.items():
        if (rank is None or r == rank) and epoch > int((out.get(r) or {}).get("epoch") or 0):
            claim = epochs.read_claim(storage, kind, r, epoch)
            if claim is not None:
                out[r] = {**claim, "status": "open"}
    return out


def registrations(run: "Run", kind: str) -> dict[int, dict]:
    """rank -> the registration that decides its writer of `kind` (none: no writer yet)."""
    return current(run._storage, kind)


def open_writers(run: "Run", kinds: Iterable[str] = TRAINING_KINDS, ranks: Sequence[int] | None = None) -> list[dict]:
    """Registrations of `kinds` not marked closed, by kind and rank. With `ranks`, each of those
    ranks must have a closed writer of every kind: one that has none yet counts as open
    (a stand-in registration with writer None)."""
    out = []
    for kind in kinds:
        regs = registrations(run, kind)
        for rank in sorted(set(regs) | set(ranks or ())):
            reg = regs.get(rank) or {"rank": rank, "kind": kind, "writer": None, "status": "unregistered"}
            if reg.get("status") != "closed":
                out.append(reg)
    return out


def format_open(writers: list[dict]) -> str:
    return "; ".join(f"rank {w.get('rank')} ({w.get('kind')}) has not registered a writer yet" if w.get("writer") is None
                     else f"writer {describe_writer(w)} is still open" for w in writers)


def wait_closed(run: "Run", kinds: Iterable[str] = TRAINING_KINDS, ranks: Sequence[int] | None = None,
                timeout_s: float = 0.0, poll_s: float = 0.5, what: str = "") -> None:
    """Return once every writer of `kinds` (of each of `ranks`) is closed; after `timeout_s`
    seconds an OpenWritersError names the ones still open."""
    kinds = list(kinds)
    deadline = time.monotonic() + max(0.0, timeout_s)
    while True:
        still = open_writers(run, kinds, ranks)
        if not still:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            waited = f" after waiting {timeout_s:g} s" if timeout_s > 0 else ""
            raise OpenWritersError(f"run {run.uri}: {what or 'its recording has not ended'}{waited}: "
                                   f"{format_open(still)}", still)
        time.sleep(min(poll_s, left))
