"""How far training got, from rank 0 to the driver: `train/progress.json` of the run.

Rank 0 posts its progress after every step; a thread of its own writes it to the run, so the
step never waits on the store. Only the newest state matters to the driver's progress bar, so
a post replaces one not yet written (latest wins). The driver polls the file
(rayattr/train/trainer.py `_follow`): its bar, a note per restart, its test seam.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from rayattr.store import Run
from rayattr.store.layout import TRAIN_PROGRESS

log = logging.getLogger(__name__)



class ProgressWriter:
    """Rank 0's progress file, written in the background (latest wins).

    The first state is written at once (the driver reads `attempt` and `start` from it);
    `post` only hands the next one over. A failed write is logged and the writer goes on with
    the next state; `close` writes the last posted state unless the thread already did, and
    raises if that fails.
    """

    def __init__(self, run: Run, state: dict[str, Any]):
        self.run = run
        self._state = dict(state)
        run.write_json(TRAIN_PROGRESS, self._state)
        self._written = self._state
        self._pending: dict[str, Any] | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="rayattr-progress", daemon=True)
        self._thread.start()

    def post(self, **fields: Any) -> None:
        """The next state (`fields` over the last one); returns at once."""
        with self._cond:
            self._state = {**self._state, **fields}
            self._pending = self._state
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                state, self._pending = self._pending, None
            try:
                self.run.write_json(TRAIN_PROGRESS, state)
                self._written = state
            except Exception:  # noqa: BLE001 - progress is advisory; close() raises for the last state
                log.warning("writing %s/%s (step %s) failed", self.run.uri, TRAIN_PROGRESS, state.get("step"),
                            exc_info=True)

    def close(self) -> None:
        """Stop the thread once it has written what is pending; the last state is in the run."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        if self._written is not self._state:
            self.run.write_json(TRAIN_PROGRESS, self._state)
            self._written = self._state
