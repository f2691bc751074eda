"""Atomic, retried object I/O on one store root (the only module that touches fsspec I/O)."""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from typing import Sequence

from fsspec.implementations.local import LocalFileSystem

from .errors import StoreError
from .fs import join_uri, open_store_fs, s3_endpoint
from .options import StoreOptions
from .retry import is_transient, s3_answer, with_retries

TMP_MARK = ".tmp-"  # local temporary files are "<dir>/.<name>.tmp-<uuid>"


class Storage:
    """Objects under one root path. Writes are atomic: a reader sees the whole object or none.

    Locally that is write-to-temp, fsync, os.replace; on S3 a single PUT (s3fs switches to a
    multipart upload above its block size, which is equally invisible until completed).
    """

    def __init__(self, uri: str, options: StoreOptions | None = None):
        self.options = options or StoreOptions()
        self.fs, self.root = open_store_fs(uri, self.options)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.scheme = "file" if self.local else "s3"
        self.uri = join_uri(self.scheme, self.root)
        self.endpoint = "" if self.local else s3_endpoint(self.options)

    # -- paths ---------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def _retry(self, fn, what, attempts: int | None = None):
        return with_retries(fn, what, self.options, self.endpoint, attempts)

    # -- checks --------------------------------------------------------------------------
    def probe(self, create_bucket: bool = False) -> None:
        """Fail early and clearly: credentials, endpoint reachability, bucket existence."""
        if self.local:
            return
        bucket = self.root.split("/")[0]
        what = f"checking bucket '{bucket}' at {self.endpoint}"
        try:
            self._retry(lambda: self.fs.call_s3("head_bucket", Bucket=bucket), what,
                        attempts=self.options.probe_attempts)
        except FileNotFoundError:
            if not create_bucket:
                raise StoreError(f"S3 bucket '{bucket}' does not exist at {self.endpoint} "
                                 "(create it, or set StoreOptions.create_bucket=True)") from None
            self._retry(lambda: self.fs.mkdir(bucket), f"creating bucket '{bucket}'")

    # -- writes --------------------------------------------------------------------------
    def put_bytes(self, rel: str, data: bytes | memoryview) -> None:
        path = self.path(rel)
        if self.local:
            self._put_local(path, data)
        else:
            self._retry(lambda: self.fs.pipe_file(path, bytes(data)), f"writing {self.uri}/{rel}")

    def create_bytes(self, rel: str, data: bytes) -> None:
        """Write a new object; FileExistsError if it exists. Of two concurrent creators exactly
        one wins: a hard link locally, a conditional PUT (If-None-Match: *) on S3.

        A conditional PUT retried after a blip can find the object its own lost first try
        created: when a retry answers "exists", the object is read back and identical bytes
        count as this creator's success (every rayattr creator puts a unique id in what it
        creates, so another creator's object never has the same bytes)."""
        path = self.path(rel)
        if self.local:
            self._put_local(path, data, exclusive=True)
            return
        tries = []

        def put():
            tries.append(1)
            return self.fs.pipe_file(path, bytes(data), mode="create")

        try:
            self._retry(put, f"creating {self.uri}/{rel}")
        except OSError as err:  # s3fs knows the 412 only when the server names the condition
            if not isinstance(err, FileExistsError) and (s3_answer(err) or (None, None))[1] != 412:
                raise
            if len(tries) > 1 and self._holds(rel, data):
                return  # our first try succeeded; only its answer was lost
            raise FileExistsError(f"{self.uri}/{rel} exists") from None

    def _holds(self, rel: str, data: bytes) -> bool:
        try:
            return self.get_bytes(rel) == bytes(data)
        except FileNotFoundError:
            return False

    def _put_local(self, path: str, data, exclusive: bool = False) -> None:
        d, name = os.path.split(path)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".{name}{TMP_MARK}{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if self.options.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            if exclusive:  # link fails when path exists; rename would replace it
                os.link(tmp, path)
                os.unlink(tmp)
            else:
                os.replace(tmp, path)
            self._fsync_dir(d)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def open_output(self, rel: str):
        """A binary file to stream one object into, as atomic as put_bytes: locally a temp file
        renamed on success, on S3 a multipart upload completed on success and aborted on error.
        Nothing is visible if the block raises; memory is one upload part, not the object."""
        path = self.path(rel)
        if self.local:
            d, name = os.path.split(path)
            os.makedirs(d, exist_ok=True)
            tmp = os.path.join(d, f".{name}{TMP_MARK}{uuid.uuid4().hex[:12]}")
            try:
                with open(tmp, "wb") as f:
                    yield f
                    if self.options.fsync:
                        f.flush()
                        os.fsync(f.fileno())
                os.replace(tmp, path)
                self._fsync_dir(d)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return
        # opening is retried; the stream itself is not (what went out cannot be taken back):
        # a failed stream leaves nothing, and its caller writes the whole object again
        f = self._retry(lambda: self.fs.open(path, "wb"), f"opening {self.uri}/{rel} for writing")
        try:
            yield f
        except BaseException:
            f.discard()  # aborts the multipart upload: no partial object
            raise
        f.close()

    def _fsync_dir(self, d: str) -> None:
        """The rename (or link) that published a file is durable only once its directory is."""
        if not self.options.fsync:
            return
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, rels: Sequence[str]) -> None:
        paths = [self.path(r) for r in rels]
        if paths:
            self._retry(lambda: self.fs.rm(paths), f"removing {len(paths)} objects")

    # -- reads ---------------------------------------------------------------------------
    def get_bytes(self, rel: str) -> bytes:
        path = self.path(rel)
        return self._retry(lambda: self.fs.cat_file(path), f"reading {self.uri}/{rel}")

    def get_many(self, rels: Sequence[str], keep_errors: bool = False) -> list:
        """Whole objects, fetched concurrently on S3. keep_errors: an object that cannot be
        read (for a reason retrying cannot fix) gives its exception in its place."""
        whole = [None] * len(rels)
        return self._ranges(rels, whole, whole, True) if keep_errors else self.get_ranges(rels, whole, whole)

    def get_ranges(self, rels: Sequence[str], starts: Sequence[int | None],
                   ends: Sequence[int | None]) -> list[bytes]:
        """Byte ranges [start, end) of objects (None = from start / to end), concurrent on S3."""
        return self._ranges(rels, starts, ends, False)

    def _ranges(self, rels, starts, ends, keep_errors: bool) -> list:
        if not rels:
            return []
        paths = [self.path(r) for r in rels]

        def fetch() -> list:
            out = self.fs.cat_ranges(paths, list(starts), list(ends), on_error="return")
            for i, (rel, o) in enumerate(zip(rels, out)):
                if isinstance(o, FileNotFoundError):
                    o = out[i] = FileNotFoundError(f"{self.uri}/{rel} does not exist")
                if isinstance(o, BaseException) and not (keep_errors and not is_transient(o)):
                    raise o  # classified (and retried if transient) by with_retries
            return out

        return self._retry(fetch, f"reading {len(paths)} objects under {self.uri}")

    def open_read(self, rel: str):
        """A seekable read-only file of one object: readers that need parts of it (a Parquet row
        group) fetch byte ranges instead of the whole object."""
        path = self.path(rel)
        what = f"reading {self.uri}/{rel}"
        f = self._retry(lambda: self.fs.open(path, "rb"), f"opening {self.uri}/{rel}")
        return f if self.local else _RetryingReader(f, lambda fn: self._retry(fn, what))

    def exists(self, rel: str) -> bool:
        path = self.path(rel)
        if self.local:
            return os.path.exists(path)
        self.fs.invalidate_cache(path)
        return self._retry(lambda: self.fs.exists(path), f"checking {self.uri}/{rel}")

    def find(self, rel_dir: str) -> list[str]:
        """All object paths under rel_dir (recursive), relative to the root, sorted."""
        base = self.path(rel_dir)
        if self.local:
            if not os.path.isdir(base):
                return []
        else:
            self.fs.invalidate_cache(base)
        try:
            found = self._retry(lambda: self.fs.find(base), f"listing {self.uri}/{rel_dir}")
        except FileNotFoundError:
            return []
        prefix = self.root.rstrip("/") + "/"
        rels = []
        for p in found:
            p = p if not self.local else p.replace(os.sep, "/")
            rels.append(p[len(prefix):] if p.startswith(prefix) else p)
        return sorted(rels)

    def list_dir(self, rel_dir: str) -> list[str]:
        """Names directly inside rel_dir (files and sub-directories), sorted."""
        base = self.path(rel_dir)
        if self.local:
            return sorted(os.listdir(base)) if os.path.isdir(base) else []
        self.fs.invalidate_cache(base)
        try:
            entries = self._retry(lambda: self.fs.ls(base, detail=False),
                                  f"listing {self.uri}/{rel_dir}")
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def glob(self, rel_pattern: str) -> list[str]:
        """Objects matching a glob pattern relative to the root, sorted."""
        base = self.path(rel_pattern)
        if not self.local:
            self.fs.invalidate_cache(self.root)
        found = self._retry(lambda: self.fs.glob(base), f"listing {self.uri}/{rel_pattern}")
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] for p in found if p.startswith(prefix))

    def sizes(self, rel_dir: str) -> dict[str, int]:
        """Size in bytes of every object under rel_dir (recursive), by path relative to the root."""
        base = self.path(rel_dir)
        if self.local and not os.path.isdir(base):
            return {}
        if not self.local:
            self.fs.invalidate_cache(base)
        try:
            found = self._retry(lambda: self.fs.find(base, detail=True), f"listing {self.uri}/{rel_dir}")
        except FileNotFoundError:
            return {}
        prefix = self.root.rstrip("/") + "/"
        out = {}
        for p, info in found.items():
            p = p.replace(os.sep, "/") if self.local else p
            out[p[len(prefix):] if p.startswith(prefix) else p] = int(info.get("size") or 0)
        return out


class _RetryingReader:
    """A read-only object file whose reads are retried: a read is repeated from the position
    it started at, so a blip in the middle of one costs a second request, not the read."""

    def __init__(self, f, retry):
        self._f, self._retry = f, retry

    def _at(self, fn):
        pos = self._f.tell()

        def again():
            self._f.seek(pos)
            return fn()
        return self._retry(again)

    def read(self, size: int = -1) -> bytes:
        return self._at(lambda: self._f.read(size))

    def readinto(self, b) -> int:
        return self._at(lambda: self._f.readinto(b))

    def __getattr__(self, name):  # seek, tell, size, close, closed, ...
        return getattr(self._f, name)

    def __iter__(self):
        return iter(self.read().splitlines(keepends=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()
