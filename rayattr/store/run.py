"""Runs: one directory per training run under a root URI, described by run.json."""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import io
import json
import os
import posixpath
import uuid
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from . import layout
from .errors import StoreError
from .fs import join_uri, split_uri
from .options import StoreOptions
from .records import (StepLoss, StepRecord, StepRecordWriter, last_record_step, read_step_losses,
                      read_step_records)
from .storage import Storage

# The run format this rayattr writes and reads; a run of any other format is refused (Run.open).
# 2: writer epochs in every writer's object names, value_se and source intervals in values/.
STORE_FORMAT = 2
# Parquet objects smaller than this decode on the calling thread: as fast at that size, and
# a process that never starts pyarrow's thread pool cannot hit its abort at interpreter exit
# ("terminate called without an active exception", apache/arrow#34314), which made about
# one `rayattr values` in six exit with status 134 after printing its answer.
THREADED_READ_BYTES = 64 << 20
# Fields the store owns in run.json; callers may not change them after creation.
OPEN_MODES = ("read", "record", "resume")  # Run.open
_FIXED_FIELDS = ("run_id", "created", "store_format")
# Directories whose objects only the writers/commit protocol may create.
# Manifest keys that smell like credentials: refused so secrets never land in run.json.
_SECRET_KEYS = {"storage_options", "secret", "secret_key", "aws_secret_access_key",
                "aws_session_token", "aws_access_key_id", "password", "credentials", "token"}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _package_version() -> str:
    from rayattr import __version__
    return __version__


def _reject_secrets(manifest: dict, options: StoreOptions) -> None:
    def walk(obj: Any, where: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if str(k).lower() in _SECRET_KEYS:
                    raise StoreError(f"manifest field '{where}{k}' looks like a credential; "
                                     "pass credentials through StoreOptions or the environment")
                walk(v, f"{where}{k}.")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{where}{i}.")
    walk(manifest, "")
    text = json.dumps(manifest)
    secrets = options.secret_values() + [os.environ.get("AWS_SECRET_ACCESS_KEY") or ""]
    if any(s and len(s) >= 8 and s in text for s in secrets):
        raise StoreError("manifest contains a credential value; refusing to write it")


def _encode_manifest(manifest: dict) -> bytes:
    try:
        return json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise StoreError(f"manifest is not JSON-serialisable: {err}") from None


def manifest_layers(manifest: dict) -> dict[str, int] | None:
    """Layer name -> dim from manifest["layers"] ({name: p} or [{"name", "dim"|"p"}]),
    or manifest["layer_dims"] ({name: p}) when "layers" is absent."""
    layers = manifest.get("layers", manifest.get("layer_dims"))
    if layers is None:
        return None
    if isinstance(layers, dict):
        return {str(k): int(v) for k, v in layers.items()}
    try:
        return {str(d["name"]): int(d.get("dim", d.get("p"))) for d in layers}
    except (TypeError, KeyError, ValueError):
        raise StoreError("manifest 'layers' must be {name: dim} or a list of "
                         "{'name': ..., 'dim': ...}") from None


class Run:
    """A run directory `<root>/<run_id>/`. Create with Run.create, open with Run.open."""

    def __init__(self, storage: Storage, run_id: str, manifest: dict, readonly: bool):
        self._storage = storage
        self.run_id = run_id
        self._manifest = manifest
        self.readonly = readonly
        self._lease = None  # the driver lease this driver holds on the run (store/lease.py)
        self._records_writer = None  # this handle's step records writer (one epoch), on first write

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def create(cls, root_uri: str, run_id: str, manifest: dict | None = None,
               options: StoreOptions | None = None, exist_ok: bool = False) -> "Run":
        """New run; StoreError if it exists (with exist_ok, the existing run opened writable)."""
        options = options or StoreOptions()
        layout.check_run_id(run_id)
        manifest = dict(manifest or {})
        _reject_secrets(manifest, options)
        for k in _FIXED_FIELDS:
            if k in manifest:
                raise StoreError(f"manifest field '{k}' is set by the store")
        root = Storage(root_uri, options)
        root.probe(create_bucket=options.create_bucket)
        storage = Storage(f"{root.uri}/{run_id}", options)
        full = {"run_id": run_id, "created": _now(), "store_format": STORE_FORMAT,
                "status": "created", "rayattr_version": _package_version(),
                "creator": uuid.uuid4().hex[:12]}  # tells two creators' run.json apart (Storage.create_bytes)
        full.update(manifest)
        try:  # exclusive: of two jobs creating the same run id, one gets this error
            storage.create_bytes(layout.RUN_JSON, _encode_manifest(full))
        except FileExistsError:
            if exist_ok:
                return cls.open(root_uri, run_id, options, mode="record")
            raise StoreError(f"run '{run_id}' already exists at {storage.uri}; another job may be "
                             "writing it (choose another run id, or --resume it)") from None
        return cls(storage, run_id, full, readonly=False)

    @classmethod
    def open(cls, root_uri: str, run_id: str, options: StoreOptions | None = None,
             mode: str = "read") -> "Run":
        """The one way to open an existing run (StoreError if there is none). `mode`:

        - "read": read-only (values, queries, reports, plans);
        - "record": writable, for whatever writes into it (recording, the stages, validation);
        - "resume": writable, and the run must hold the config the pipeline recorded, so its
          stages can be replayed (`rayattr train --resume`).

        Every other opener resolves a name to (root, run id) and calls this."""
        if mode not in OPEN_MODES:
            raise StoreError(f"mode must be one of {OPEN_MODES}, got {mode!r}")
        options = options or StoreOptions()
        layout.check_run_id(run_id)
        root = Storage(root_uri, options)
        root.probe()
        storage = Storage(f"{root.uri}/{run_id}", options)
        try:
            raw = storage.get_bytes(layout.RUN_JSON)
        except FileNotFoundError:
            known = [r["run_id"] for r in list_runs(root_uri, options)][:10] if root.exists("") else []
            raise StoreError(f"run '{run_id}' does not exist under {root.uri} (no run.json); "
                             f"existing runs: {known or 'none'}") from None
        try:
            manifest = json.loads(raw)
        except ValueError as err:
            raise StoreError(f"{storage.uri}/run.json is not valid JSON: {err}") from None
        found = manifest.get("store_format") if isinstance(manifest, dict) else None
        if found != STORE_FORMAT:
            raise StoreError(f"run {storage.uri} is in store format {found}, but this rayattr "
                             f"({_package_version()}) reads store format {STORE_FORMAT} only: record it "
                             "again with this version, or read it with the rayattr that made it")
        if mode == "resume" and "config" not in manifest:
            raise StoreError(f"run {storage.uri} has no recorded config: it was not made by rayattr's "
                             "pipeline, so it cannot be resumed")
        return cls(storage, run_id, manifest, readonly=mode == "read")

    @classmethod
    def open_uri(cls, run_uri: str, options: StoreOptions | None = None,
                 mode: str = "read") -> "Run":
        """Run.open from the run's own URI, e.g. s3://bucket/prefix/run-001: what workers and
        actors are handed (one string, not a root and an id)."""
        scheme, path = split_uri(run_uri)
        parent, run_id = posixpath.split(path.rstrip("/"))
        if not parent or not run_id:
            raise StoreError(f"'{run_uri}' is not a run URI (expected <root>/<run_id>)")
        return cls.open(join_uri(scheme, parent), run_id, options, mode)

    # -- manifest --------------------------------------------------------------------------
    @property
    def uri(self) -> str:
        return self._storage.uri

    @property
    def options(self) -> StoreOptions:
        return self._storage.options

    @property
    def manifest(self) -> dict:
        return copy.deepcopy(self._manifest)

    def reload_manifest(self) -> dict:
        self._manifest = json.loads(self._storage.get_bytes(layout.RUN_JSON))
        return self.manifest

    def update_manifest(self, **fields: Any) -> dict:
        """Merge fields into run.json.

        A read-modify-write, not a compare-and-swap: it is serialised by the driver lease
        (store/lease.py). One driver holds a run at a time, and the writers it starts (the
        trainer, rank 0's Recorder, the segments) update the manifest while the driver waits
        for them. A driver that holds the lease must still hold it: one that lost it (it
        stalled past the lease's ttl and another driver took the run over) is refused."""
        self._check_writable("update_manifest")
        if self._lease is not None:
            self._lease.check()
        for k in _FIXED_FIELDS:
            if k in fields:
                raise StoreError(f"manifest field '{k}' is set by the store")
        _reject_secrets(fields, self.options)
        current = json.loads(self._storage.get_bytes(layout.RUN_JSON))
        current.update(fields)
        current["updated"] = _now()
        self._storage.put_bytes(layout.RUN_JSON, _encode_manifest(current))
        self._manifest = current
        return self.manifest

    def layers(self) -> dict[str, int] | None:
        return manifest_layers(self._manifest)

    def check_compatible(self, layers: dict[str, int] | None = None,
                         projection: dict | None = None) -> None:
        """StoreError if layers (name -> dim) or the projection spec differ from the manifest.

        Besides the model's layers, a writer may use the manifest's `derived_layers`: layers the
        embedding stage derives from them (projection blocks)."""
        recorded = self.layers()
        if recorded is not None:
            recorded = {**recorded, **{k: int(v) for k, v in (self._manifest.get("derived_layers") or {}).items()}}
        if layers is not None and recorded is not None:
            for name, p in layers.items():
                if name not in recorded:
                    raise StoreError(f"layer '{name}' is not one of run '{self.run_id}''s layers "
                                     f"{sorted(recorded)}")
                if int(p) != recorded[name]:
                    raise StoreError(f"layer '{name}' has dim {p} but run '{self.run_id}' "
                                     f"recorded {recorded[name]}")
        spec = self._manifest.get("projection")
        if projection is not None and spec is not None:
            given = json.loads(json.dumps(projection, sort_keys=True))
            if given != spec:
                keys = sorted(k for k in set(given) | set(spec) if given.get(k) != spec.get(k)) \
                    if isinstance(given, dict) and isinstance(spec, dict) else ["<whole spec>"]
                raise StoreError(f"projection spec does not match run '{self.run_id}': "
                                 f"differs in {keys}")

    # -- free-form objects -----------------------------------------------------------------
    def _check_writable(self, what: str) -> None:
        if self.readonly:
            raise StoreError(f"run '{self.run_id}' is open read-only; {what} needs "
                             "Run.open(..., mode='record')")

    def _rel(self, rel: str, writing: bool = False) -> str:
        parts = rel.replace("\\", "/").split("/") if isinstance(rel, str) else [""]
        if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise StoreError(f"invalid path inside a run: {rel!r}")
        if writing and (rel == layout.RUN_JSON or rel.startswith(layout.MANAGED_DIRS)):
            raise StoreError(f"'{rel}' is managed by the store (use update_manifest, "
                             "GradientWriter or write_step_records)")
        return rel

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic: temp file + rename locally, one PUT on S3."""
        self._check_writable("write_bytes")
        self._storage.put_bytes(self._rel(rel, writing=True), data)

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self._storage.get_bytes(self._rel(rel))
        except FileNotFoundError:
            raise StoreError(f"{self.uri}/{rel} does not exist") from None

    def open_read(self, rel: str):
        """A seekable read-only file of an object of the run (range reads on S3)."""
        try:
            return self._storage.open_read(self._rel(rel))
        except FileNotFoundError:
            raise StoreError(f"{self.uri}/{rel} does not exist") from None

    def write_json(self, rel: str, obj: Any) -> None:
        try:
            data = json.dumps(obj, indent=2, allow_nan=False).encode()
        except (TypeError, ValueError) as err:
            raise StoreError(f"{rel}: object is not JSON-serialisable: {err}") from None
        self.write_bytes(rel, data)

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_table(self, rel: str, table: pa.Table) -> None:
        """A pyarrow Table as Parquet (.parquet) or Arrow IPC (.arrow / .feather)."""
        sink = io.BytesIO() if rel.endswith(".parquet") else pa.BufferOutputStream()
        if rel.endswith(".parquet"):
            pq.write_table(table, sink, compression="zstd")
            data = sink.getvalue()
        elif rel.endswith((".arrow", ".feather")):
            with pa.ipc.new_file(sink, table.schema) as w:
                w.write_table(table)
            data = sink.getvalue().to_pybytes()
        else:
            raise StoreError(f"write_table: '{rel}' needs a .parquet, .arrow or .feather suffix")
        self.write_bytes(rel, data)

    @contextlib.contextmanager
    def table_writer(self, rel: str):
        """Stream a Parquet table into the run batch by batch: yields an object whose
        write(table) appends row groups (the schema is the first table's). Atomic like
        write_table: nothing is visible if the block raises."""
        if not rel.endswith(".parquet"):
            raise StoreError(f"table_writer: '{rel}' needs a .parquet suffix")
        self._check_writable("table_writer")
        with self._storage.open_output(self._rel(rel, writing=True)) as f:
            out = _ParquetStream(f)
            try:
                yield out
            finally:  # on an error too (into the temp object that is then dropped)
                out.close()

    def read_table(self, rel: str) -> pa.Table:
        data = self.read_bytes(rel)
        if rel.endswith(".parquet"):
            # ParquetFile, not read_table: one object needs no pyarrow.dataset (which imports pandas)
            return pq.ParquetFile(pa.BufferReader(data)).read(use_threads=len(data) > THREADED_READ_BYTES)
        if rel.endswith((".arrow", ".feather")):
            return pa.ipc.open_file(pa.py_buffer(data)).read_all()
        raise StoreError(f"read_table: '{rel}' needs a .parquet, .arrow or .feather suffix")

    def exists(self, rel: str) -> bool:
        return self._storage.exists(self._rel(rel))

    def list(self, rel_dir: str = "") -> list[str]:
        """Names directly inside a directory of the run (sorted)."""
        return self._storage.list_dir(self._rel(rel_dir) if rel_dir else "")

    # -- step records ----------------------------------------------------------------------
    def write_step_records(self, records: Sequence[StepRecord]) -> None:
        """Commit step records (one chunk + one commit entry per call). The handle is one
        writer: its first call claims a records epoch (store/records.py, StepRecordWriter),
        and a step it records again replaces its earlier record. A handle that starts writing
        later supersedes it: what this one commits from then on past the records is ignored."""
        self._check_writable("write_step_records")
        if not records:
            return
        if self._records_writer is None:
            self._records_writer = StepRecordWriter(self)
        self._records_writer.write(records)

    def step_records(self, step_start: int = 0, step_end: int | None = None) -> list[StepRecord]:
        """Committed step records of [step_start, step_end) in step order (end None: all;
        a re-written step: the later writer's, or its writer's later commit)."""
        return read_step_records(self, step_start, step_end)

    def step_losses(self) -> list[StepLoss]:
        """Every committed step's loss (step and loss columns only), in step order."""
        return read_step_losses(self)

    def last_step_record(self) -> int | None:
        """Step of the last committed step record (None: none), from the index's object names
        alone: what max(r.step for r in step_records()) is, without reading the records."""
        return last_record_step(self)

    def compact_index(self, kinds: Sequence[str]) -> dict[str, int]:
        """Fold each kind's loose commit entries into its index manifests (store/index.py):
        kind -> entries folded. One compactor at a time (the driver, between stages)."""
        from .index import compact

        self._check_writable("compact_index")
        if self._lease is not None:
            self._lease.check()
        return {k: compact(self._storage, k) for k in kinds}

    def __repr__(self) -> str:
        return f"Run({self.uri!r}, readonly={self.readonly})"


class _ParquetStream:
    """pq.ParquetWriter opened on the first table written (an empty stream writes nothing)."""

    def __init__(self, f):
        self.f, self.writer = f, None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.f, table.schema, compression="zstd")
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def list_runs(root_uri: str, options: StoreOptions | None = None) -> list[dict]:
    """Runs under a root: run_id, uri, status, created and the manifest's other scalar fields."""
    options = options or StoreOptions()
    root = Storage(root_uri, options)
    root.probe()
    if root.local and not root.exists(""):  # a typo must not read as "no runs yet"
        raise StoreError(f"no store at {root.uri}: the directory does not exist (runs are looked up in "
                         "$RAYATTR_STORE, else ./rayattr_runs; set RAYATTR_STORE or name the store)")
    found = root.glob(f"*/{layout.RUN_JSON}")
    out = []
    for rel, raw in zip(found, root.get_many(found, keep_errors=True)):
        run_id = rel.split("/")[0]
        m, problem = _parse_manifest(raw)
        # a run whose run.json cannot be read is listed, marked, never skipped: it holds data
        info = {"status": "unreadable", "error": problem} if problem else \
            {k: v for k, v in m.items() if isinstance(v, (str, int, float, bool))}
        info.update(run_id=run_id, uri=f"{root.uri}/{run_id}")
        info.setdefault("status", "unknown")
        info.setdefault("created", "")
        out.append(info)
    return sorted(out, key=lambda d: d["run_id"])


def _parse_manifest(raw) -> tuple[dict, str]:
    """(manifest, "") or ({}, why run.json cannot be read)."""
    if isinstance(raw, BaseException):
        return {}, f"run.json cannot be read ({type(raw).__name__}: {raw})"
    try:
        m = json.loads(raw)
    except ValueError as err:
        return {}, f"run.json is not valid JSON ({err})"
    if not isinstance(m, dict):
        return {}, f"run.json holds a JSON {type(m).__name__}, not an object"
    return m, ""
