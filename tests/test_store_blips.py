"""Store I/O that survives blips, against a flaky in-process filesystem that answers like s3fs."""

from __future__ import annotations

import io
import os
import stat

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from rayattr.store.options import StoreOptions
from rayattr.store.storage import Storage

FAST = StoreOptions(backoff_s=0.001, backoff_max_s=0.002)


def _precondition_failed() -> OSError:
    err = OSError("At least one of the pre-conditions you specified did not hold")
    err.response = {"Error": {"Code": "PreconditionFailed"}, "ResponseMetadata": {"HTTPStatusCode": 412}}
    return err


class FlakyFS(MemoryFileSystem):
    """Memory objects; `blips` names the operations whose next call fails once."""

    def __init__(self, *a, **kw):
        super().__init__(*a, skip_instance_cache=True, **kw)
        self.blips: set[str] = set()

    def _blip(self, what: str) -> bool:
        if what in self.blips:
            self.blips.discard(what)
            return True
        return False

    def pipe_file(self, path, value, mode="overwrite", **kw):
        if mode == "create":
            if self.exists(path):
                raise _precondition_failed()
            super().pipe_file(path, value, **kw)
            if self._blip("create-answer"):  # the PUT succeeded, its answer was lost
                raise ConnectionError("connection reset by peer")
            return
        super().pipe_file(path, value, **kw)

    def _open(self, path, mode="rb", **kw):
        if "w" in mode and self._blip("open-write"):
            raise ConnectionError("connection reset by peer")
        f = super()._open(path, mode, **kw)
        if "r" not in mode:
            return f
        fs = self

        class Flaky(io.BytesIO):
            def read(self, size=-1):
                if fs._blip("read"):
                    super().read(3)  # part of the answer came, then the connection dropped
                    raise ConnectionError("connection reset by peer")
                return super().read(size)
        return Flaky(f.getvalue())


@pytest.fixture
def s3ish(tmp_path):
    st = Storage(str(tmp_path), FAST)
    st.fs, st.local, st.root, st.uri = FlakyFS(), False, f"/bucket{tmp_path}", f"s3://bucket{tmp_path}"
    st.scheme = "s3"
    return st


def test_a_retried_create_whose_first_try_succeeded_is_a_success(s3ish):
    s3ish.fs.blips.add("create-answer")
    s3ish.create_bytes("lease", b"mine")
    assert s3ish.get_bytes("lease") == b"mine"
    s3ish.fs.blips.add("create-answer")  # but another creator's object is still "exists"
    with pytest.raises(FileExistsError):
        s3ish.create_bytes("lease", b"theirs")
    with pytest.raises(FileExistsError):  # and so is our own bytes without a retry
        s3ish.create_bytes("lease", b"mine")


def test_a_read_cut_in_the_middle_is_retried_from_where_it_started(s3ish):
    s3ish.put_bytes("obj", bytes(range(32)))
    with s3ish.open_read("obj") as f:
        f.seek(2)
        s3ish.fs.blips.add("read")
        assert f.read(5) == bytes(range(2, 7))
        assert f.read(2) == bytes([7, 8])


def test_opening_a_stream_is_retried(s3ish):
    s3ish.fs.blips.add("open-write")
    with s3ish.open_output("out") as f:
        f.write(b"abc")
    assert s3ish.get_bytes("out") == b"abc"


def test_local_writes_fsync_the_directory_too(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    st = Storage(str(tmp_path))
    st.put_bytes("a/b", b"1")
    assert synced == ["file", "dir"]
    synced.clear()
    st.create_bytes("a/c", b"1")
    assert synced == ["file", "dir"]
    synced.clear()
    with st.open_output("a/d") as f:
        f.write(b"1")
    assert synced == ["file", "dir"]
