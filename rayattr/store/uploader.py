"""A background thread that runs upload jobs in order, behind a bounded queue.

submit() returns as soon as the job is queued, and blocks while the queue is full
(back-pressure: the producer can get at most `depth` jobs ahead of the network). The first
failure is kept and re-raised by the next submit/drain/close; jobs after a failure are
dropped, so nothing is committed out of order after a gap.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

_STOP = object()


class BackgroundUploader:
    def __init__(self, depth: int, name: str = "rayattr-upload"):
        if depth < 1:
            raise ValueError(f"queue depth must be >= 1, got {depth}")
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._q.get()
            try:
                if job is _STOP:
                    return
                if self._error is None:
                    job()
            except BaseException as err:  # noqa: BLE001 - handed to the producer thread
                self._error = err
            finally:
                self._q.task_done()

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, job: Callable[[], None]) -> None:
        if self._closed:
            raise RuntimeError("uploader is closed")
        while True:
            self.raise_if_failed()
            try:
                self._q.put(job, timeout=0.1)
                return
            except queue.Full:
                continue

    def drain(self) -> None:
        """Wait until every queued job has run, then re-raise a failure if there was one."""
        self._q.join()
        self.raise_if_failed()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.drain()
        finally:
            self._closed = True
            self._q.put(_STOP)
            self._thread.join()
