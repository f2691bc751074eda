"""The store's filesystem as pyarrow sees it (Ray Train's checkpoint storage): files written
and read back on local files and S3, the handler survives pickling (Ray ships it to its
controller), and transient failures are retried while others are not."""

from __future__ import annotations

import pickle

import pytest
from pyarrow.fs import FileSelector, FileType

from rayattr.store import StoreError, StoreOptions
from rayattr.store.arrow_fs import arrow_filesystem
from rayattr.store.fs import open_store_fs


def test_write_list_read_delete(store_root):
    fs, root = open_store_fs(store_root.uri, store_root.options)
    afs = pickle.loads(pickle.dumps(arrow_filesystem(fs, store_root.options)))
    base = f"{root}/checkpoints/checkpoint_1"
    afs.create_dir(base, recursive=True)
    payload = bytes(range(256)) * 4096  # 1 MiB
    for name in ("model.pt", "optim.pt"):
        with afs.open_output_stream(f"{base}/{name}") as f:
            f.write(payload[:100])
            f.write(payload[100:])
    infos = afs.get_file_info(FileSelector(base))
    assert sorted(i.base_name for i in infos) == ["model.pt", "optim.pt"]
    assert all(i.type == FileType.File and i.size == len(payload) for i in infos)
    with afs.open_input_file(f"{base}/model.pt") as f:
        assert f.read() == payload
    afs.delete_dir(base)  # (SeaweedFS may keep an empty folder entry: only the files must be gone)
    assert afs.get_file_info(FileSelector(base, allow_not_found=True)) == []
    assert afs.get_file_info(f"{base}/model.pt").type == FileType.NotFound


class Flaky:
    """An fsspec filesystem whose uploads fail `fails` times with `error` first (fault injection)."""

    def __init__(self, fs, fails: int, error: Exception):
        self.fs, self.fails, self.error, self.calls = fs, fails, error, 0

    def put_file(self, lpath, rpath, **kw):
        self.calls += 1
        if self.calls <= self.fails:
            raise self.error
        return self.fs.put_file(lpath, rpath, **kw)

    def __getattr__(self, name):
        return getattr(self.fs, name)


def test_uploads_are_retried_on_transient_errors_only(tmp_path):
    fs, root = open_store_fs(str(tmp_path))
    options = StoreOptions(max_attempts=3, backoff_s=0.01)
    flaky = Flaky(fs, fails=2, error=ConnectionError("connection reset"))
    afs = arrow_filesystem(flaky, options)
    with afs.open_output_stream(f"{root}/a.bin") as f:
        f.write(b"x" * 10)
    assert flaky.calls == 3 and (tmp_path / "a.bin").read_bytes() == b"x" * 10

    down = arrow_filesystem(Flaky(fs, fails=5, error=ConnectionError("refused")), options)
    with pytest.raises(StoreError, match="unreachable after 3 attempts"):
        with down.open_output_stream(f"{root}/b.bin") as f:
            f.write(b"y")
    bad = Flaky(fs, fails=1, error=ValueError("not transient"))
    with pytest.raises(ValueError):
        with arrow_filesystem(bad, options).open_output_stream(f"{root}/c.bin") as f:
            f.write(b"z")
    assert bad.calls == 1 and not (tmp_path / "b.bin").exists() and not (tmp_path / "c.bin").exists()
