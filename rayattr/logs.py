"""Log records, shown and silenced: an entry point shows the `rayattr` logger's warnings once
each on stderr (library code logs, only entry points print), and messages checked to be
harmless are dropped by their exact text."""

from __future__ import annotations

import logging
import sys


class _LevelPrefix(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {super().format(record)}"


def show_warnings(stream=None) -> logging.Handler:
    """Print the `rayattr` logger's WARNING and ERROR records on `stream` (stderr); idempotent.
    The logger stops propagating, so a root handler (Python's last resort, Ray's) does not print
    them a second time."""
    logger = logging.getLogger("rayattr")
    for h in logger.handlers:
        if getattr(h, "_rayattr_entry_point", False):
            return h
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_LevelPrefix("%(message)s"))
    handler._rayattr_entry_point = True
    logger.addHandler(handler)
    logger.propagate = False
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
