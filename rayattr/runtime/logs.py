"""Log records, shown and silenced: an entry point shows the `rayattr` logger's warnings once
each on stderr (library code logs, only entry points print), and messages checked to be
harmless are dropped by their exact text."""

from __future__ import annotations

import logging
import sys


# Loggers whose INFO records an entry point shows too, as they are: where Ray runs ("ray:
# started a local Ray instance at ...").
NOTES = ("rayattr.runtime.cluster",)


class _LevelPrefix(logging.Formatter):
    """"warning: ..." for warnings and errors; a note (INFO) as it is."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def _shown(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name in NOTES


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever sys.stderr is when a record comes (a test's capture, a
    redirected stream), or on the stream it was given."""

    def __init__(self, stream=None):
        super().__init__(stream)
        self._fixed = stream

    @property
    def stream(self):
        return self._fixed if self._fixed is not None else sys.stderr

    @stream.setter
    def stream(self, value):
        pass  # StreamHandler.__init__ sets it; the property decides


def show_warnings(stream=None) -> logging.Handler:
    """Print the `rayattr` logger's WARNING and ERROR records, and the NOTES loggers' INFO
    records, on `stream` (default: stderr as it is at each record): what an entry point shows.
    Idempotent, so each record prints once. With this handler found, Python's last-resort
    handler no longer prints the warnings a second time."""
    logger = logging.getLogger("rayattr")
    for name in NOTES:
        logging.getLogger(name).setLevel(logging.INFO)
    for h in logger.handlers:
        if isinstance(h, _StderrHandler):
            return h
    handler = _StderrHandler(stream)
    handler.setLevel(logging.INFO)
    handler.addFilter(_shown)
    handler.setFormatter(_LevelPrefix("%(message)s"))
    logger.addHandler(handler)
    return handler


class DropMessages(logging.Filter):
    """Drops log records whose message contains one of `fragments`."""

    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = tuple(fragments)

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(f in text for f in self.fragments)


def drop_messages(logger: logging.Logger, fragments: tuple[str, ...]) -> None:
    """`logger` drops records containing one of `fragments` (replacing an earlier such filter)."""
    for f in [f for f in logger.filters if isinstance(f, DropMessages)]:
        logger.removeFilter(f)
    logger.addFilter(DropMessages(fragments))
