"""The store's filesystem as a pyarrow filesystem, with the store's retries: what Ray Train
writes its checkpoints and its checkpoint-manager snapshot through (rayattr/train/checkpoints.py),
so an object-store outage that the store's own writes ride out (store/retry.py) does not fail
training either.

Each call is retried as a whole on transient errors. A written file goes to local scratch
first and is uploaded, with retries, when it is closed: s3fs uploads on close anyway, and a
retry needs the whole object.
"""

from __future__ import annotations

import io
import os
import tempfile

from pyarrow import PythonFile
from pyarrow.fs import FSSpecHandler, PyFileSystem

from .options import StoreOptions
from .retry import with_retries


class RetryingHandler(FSSpecHandler):
    """pyarrow's FSSpecHandler whose calls go through with_retries."""

    def __init__(self, fs, options: StoreOptions):
        super().__init__(fs)
        self.options = options

    def _retried(self, what: str, fn):
        return with_retries(fn, what, self.options)

    # s3fs caches listings: another process (a worker, the controller) may have written since
    def get_file_info(self, paths):
        for p in paths:
            self.fs.invalidate_cache(p)
        return self._retried(f"stat of {len(paths)} paths", lambda: super(RetryingHandler, self).get_file_info(paths))

    def get_file_info_selector(self, selector):
        self.fs.invalidate_cache(selector.base_dir)
        return self._retried(f"listing {selector.base_dir}",
                             lambda: super(RetryingHandler, self).get_file_info_selector(selector))

    def create_dir(self, path, recursive):
        return self._retried(f"creating {path}", lambda: super(RetryingHandler, self).create_dir(path, recursive))

    def delete_dir(self, path):
        return self._retried(f"deleting {path}", lambda: super(RetryingHandler, self).delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        return self._retried(f"emptying {path}",
                             lambda: super(RetryingHandler, self).delete_dir_contents(path, missing_dir_ok))

    def delete_file(self, path):
        return self._retried(f"deleting {path}", lambda: super(RetryingHandler, self).delete_file(path))

    def move(self, src, dest):
        return self._retried(f"moving {src}", lambda: super(RetryingHandler, self).move(src, dest))

    def copy_file(self, src, dest):
        return self._retried(f"copying {src}", lambda: super(RetryingHandler, self).copy_file(src, dest))

    def open_input_stream(self, path):
        return self._retried(f"opening {path}", lambda: super(RetryingHandler, self).open_input_stream(path))

    def open_input_file(self, path):
        return self._retried(f"opening {path}", lambda: super(RetryingHandler, self).open_input_file(path))

    def open_output_stream(self, path, metadata):
        return PythonFile(_UploadOnClose(self.fs, path, self.options), mode="w")

    def open_append_stream(self, path, metadata):
        raise NotImplementedError("the store's objects are written whole, never appended to")


class _UploadOnClose(io.RawIOBase):
    """A write-only file kept in local scratch and uploaded whole, with retries, on close."""

    def __init__(self, fs, path: str, options: StoreOptions):
        super().__init__()
        self.fs, self.path, self.options = fs, path, options
        fd, self.scratch = tempfile.mkstemp(prefix="rayattr-upload-")
        self.file = os.fdopen(fd, "wb")

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self.file.write(data)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.file.close()
            with_retries(lambda: self.fs.put_file(self.scratch, self.path), f"writing {self.path}", self.options)
        finally:
            os.unlink(self.scratch)
            super().close()


def arrow_filesystem(fs, options: StoreOptions) -> PyFileSystem:
    """A pyarrow filesystem over the store's fsspec filesystem, with the store's retries."""
    return PyFileSystem(RetryingHandler(fs, options))
