"""The one family of errors a user can cause: bad input, a run that cannot be used as asked, a
fault in the store or in training that leaves committed data intact.

Every error rayattr raises for something a user can act on derives from RayattrError; the
`rayattr` command prints those as one line and exits 2. Anything else is a bug in rayattr:
the command shows its traceback and exits 1.
"""

from __future__ import annotations

USER_ERROR_EXIT = 2  # a RayattrError: bad input, or a run that cannot be used as asked
BUG_EXIT = 1  # anything else: a bug in rayattr, shown with its traceback


class RayattrError(Exception):
    """Base of every error a user can cause; the message names the object involved."""


class UsageError(RayattrError, ValueError):
    """An argument or call that cannot be used as given (a ValueError too, for callers that
    only know "bad value")."""


class IncompleteInputError(RayattrError, RuntimeError):
    """A step of a segment does not hold exactly its record's rows (a missing step, a missing
    rank, a missing kind, or a writer that is still open): the segment is refused rather than
    embedded from part of its input."""


def error_line(err: BaseException) -> str:
    """A user error as the command prints it, on one line: the error itself, not the Ray task
    traceback that carried it from an actor (Ray's wrapper keeps it as `cause`)."""
    cause = getattr(err, "cause", None)
    return " ".join(str(cause if isinstance(cause, RayattrError) else err).split())
