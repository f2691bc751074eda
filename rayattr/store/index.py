"""Compacted commit manifests: a reader opens a few objects per kind and step range instead of
one commit entry per shard (docs/store.md, "Index").

Writers keep committing one small entry per shard (commits/<kind>/rNNNN/<range>.json, the
crash-safe protocol of commits.py). `compact` later folds the loose entries of a kind, all
ranks together, into one Parquet manifest per span of steps,

    commits/<kind>/index/c<chunk>-<first>-<last>.parquet   (one row per entry)

and only then removes the entries it folded. A reader unions the manifests whose [first,
last] overlaps its step range with whatever loose entries remain; an entry seen twice (a
crash between the manifest's PUT and the removals, or between a replacing manifest and the
removal of the one it replaces) is the same entry, and dedup drops the copy. So at every
point of a compaction a reader sees exactly the committed entries.

One compactor at a time: the driver, between stages (rayattr/pipeline/stages.py). Two at once
could each replace a chunk's manifest with a union missing the other's new entries.
"""

from __future__ import annotations

import io
import posixpath
import re

import pyarrow as pa
import pyarrow.parquet as pq

from rayattr.runtime import hooks

from . import epochs
from .commits import ShardCommit
from . import layout
from .layout import RECORDS_KIND, RECORDS_RANK, RECORDS_WRITER_RANK
from .errors import StoreError
from .storage import Storage

INDEX = "index"
SPAN = 4096  # steps per manifest chunk: a segment's reader opens one or two of them
_NAME = re.compile(r"^c(\d+)-(\d+)-(\d+)\.parquet$")
_ENTRY = re.compile(r"^(\d+)-(\d+)\.e\d+\.json$")  # <first>-<last>.e<writer epoch>.json
_SCHEMA = pa.schema([("rank", pa.int64()), ("step_first", pa.int64()), ("step_last", pa.int64()),
                     ("shard", pa.string()), ("entry", pa.string())])


def index_dir(kind: str) -> str:
    return f"{layout.commit_dir(kind)}/{INDEX}"


def manifest_name(chunk: int, first: int, last: int) -> str:
    return f"c{chunk:08d}-{first:08d}-{last:08d}.parquet"


def _manifests(storage: Storage, kind: str) -> list[tuple[str, int, int, int]]:
    """(path, chunk, first step, last step) of every manifest of a kind (one LIST)."""
    out = []
    for rel in storage.find(index_dir(kind)):
        m = _NAME.match(posixpath.basename(rel))
        if m:
            out.append((rel, int(m[1]), int(m[2]), int(m[3])))
    return out


def _loose(storage: Storage, kind: str, rank_dir: str | None = None) -> list[str]:
    base = f"{layout.commit_dir(kind)}/{rank_dir}" if rank_dir else layout.commit_dir(kind)
    prefix = index_dir(kind) + "/"
    return [r for r in storage.find(base) if r.endswith(".json") and not r.startswith(prefix)
            and not posixpath.basename(r).startswith(".")]


def _encode(entries: list[ShardCommit]) -> bytes:
    table = pa.table({"rank": [e.rank for e in entries], "step_first": [e.step_first for e in entries],
                      "step_last": [e.step_last for e in entries], "shard": [e.shard for e in entries],
                      "entry": [e.to_json().decode() for e in entries]}, schema=_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _decode(data: bytes, where: str) -> list[ShardCommit]:
    try:
        rows = pq.ParquetFile(pa.BufferReader(data)).read(columns=["entry"], use_threads=False)["entry"]
    except (pa.ArrowInvalid, KeyError) as err:
        raise StoreError(f"unreadable commit manifest {where}: {err}") from None
    return [ShardCommit.from_json(e.encode(), where) for e in rows.to_pylist()]


def _key(e: ShardCommit) -> tuple:
    return (e.rank, e.shard, e.committed_at, e.writer)


def _overlaps(first: int, last: int, start: int, end: int | None) -> bool:
    return last >= start and (end is None or first < end)


def load_entries(storage: Storage, kind: str, rank: int | None = None, rank_dir: str | None = None,
                 step_start: int = 0, step_end: int | None = None) -> list[ShardCommit]:
    """Committed entries of `kind` (of one rank when `rank` is given, whose loose entries live
    under `rank_dir`) overlapping [step_start, step_end): the manifests that overlap the range
    and the loose entries, each entry once. A compaction running meanwhile can remove an
    object between the listing and the read: then the listing is done again."""
    for attempt in range(3):
        try:
            entries = _load_entries(storage, kind, rank, rank_dir, step_start, step_end)
            # the claims are listed after the entries: an entry a zombie writer committed after
            # its successor's claim is then always judged against that claim
            return epochs.fence(entries, _claims(storage, kind))
        except FileNotFoundError:
            if attempt == 2:
                raise


def _claims(storage: Storage, kind: str) -> dict[int, dict[int, int]]:
    """epochs.claims, keyed by the rank the entries name: the step records' writer claims as
    rank 0 (RECORDS_WRITER_RANK) and its entries name rank -1 (RECORDS_RANK)."""
    by_rank = epochs.claims(storage, kind)
    if kind != RECORDS_KIND:
        return by_rank
    own = by_rank.get(RECORDS_WRITER_RANK)
    return {RECORDS_RANK: own} if own else {}


def _load_entries(storage, kind, rank, rank_dir, step_start, step_end) -> list[ShardCommit]:
    mans = [m for m in _manifests(storage, kind) if _overlaps(m[2], m[3], step_start, step_end)]
    loose = _loose(storage, kind, rank_dir)
    blobs = storage.get_many([m[0] for m in mans] + loose)
    entries: dict[tuple, ShardCommit] = {}
    for (rel, *_), data in zip(mans, blobs[:len(mans)]):
        for e in _decode(data, f"{storage.uri}/{rel}"):
            entries.setdefault(_key(e), e)
    for rel, data in zip(loose, blobs[len(mans):]):
        e = ShardCommit.from_json(data, f"{storage.uri}/{rel}")
        entries.setdefault(_key(e), e)
    return [e for e in entries.values() if (rank is None or e.rank == rank)
            and _overlaps(e.step_first, e.step_last, step_start, step_end)]


def last_step(storage: Storage, kind: str) -> int | None:
    """The largest step_last of the committed entries of `kind` (None: none), from object
    names only (unless a writer of the kind was succeeded): a manifest's name carries the last
    step of the entries it folds and a loose entry's name its own step range, so nothing is
    read but three listings (with the claims). The loose entries are listed before the
    manifests: a compaction running in between has then written the manifest of whatever
    entry it removed."""
    best = None
    for rel in _loose(storage, kind):
        m = _ENTRY.match(posixpath.basename(rel))
        last = int(m[2]) if m else ShardCommit.from_json(storage.get_bytes(rel), f"{storage.uri}/{rel}").step_last
        best = last if best is None else max(best, last)
    for _, _, _, last in _manifests(storage, kind):
        best = last if best is None else max(best, last)
    if best is not None and _claims(storage, kind):
        # a writer was succeeded: what its zombie committed later is fenced off (store/epochs.py)
        # and must not count, so the entries are read (rare: only after a restart)
        best = max((e.step_last for e in load_entries(storage, kind)), default=None)
    return best


def compact(storage: Storage, kind: str, span: int = SPAN) -> int:
    """Fold the loose entries of `kind` into per-chunk manifests; returns how many were folded.

    Order, for crash safety: the new manifest of a chunk (union of the old one and the loose
    entries) is PUT first, then the manifest it replaces is removed, then the loose entries.
    """
    loose = _loose(storage, kind)
    if not loose:
        return 0
    # entries are named <first>-<last>.json: grouped by chunk from the names, so only one
    # chunk's entries are ever in memory
    names: dict[int, list[str]] = {}
    for rel in loose:
        m = _ENTRY.match(posixpath.basename(rel))
        if not m:
            raise StoreError(f"unexpected commit entry name {storage.uri}/{rel}")
        names.setdefault(int(m[1]) // span, []).append(rel)
    existing: dict[int, list[str]] = {}
    for rel, chunk, _, _ in _manifests(storage, kind):
        existing.setdefault(chunk, []).append(rel)
    for chunk, rels in sorted(names.items()):
        items = [(r, ShardCommit.from_json(b, f"{storage.uri}/{r}")) for r, b in zip(rels, storage.get_many(rels))]
        old = existing.get(chunk, [])
        merged: dict[tuple, ShardCommit] = {}
        for rel, data in zip(old, storage.get_many(old)):
            for e in _decode(data, f"{storage.uri}/{rel}"):
                merged.setdefault(_key(e), e)
        for _, e in items:
            merged.setdefault(_key(e), e)
        folded = sorted(merged.values(), key=lambda e: (e.step_first, e.rank, e.committed_at))
        name = manifest_name(chunk, min(e.step_first for e in folded), max(e.step_last for e in folded))
        rel = f"{index_dir(kind)}/{name}"
        storage.put_bytes(rel, _encode(folded))
        hooks.call("index.compact", kind=kind, chunk=chunk, at="manifest written")  # test seam
        stale = [r for r in old if r != rel]
        if stale:
            storage.remove(stale)
        hooks.call("index.compact", kind=kind, chunk=chunk, at="old manifest removed")
        done = [r for r, _ in items]
        for i in range(0, len(done), 1000):  # S3 deletes at most 1000 keys per request
            storage.remove(done[i:i + 1000])
    return len(loose)
