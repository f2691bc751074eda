"""The one family of errors a user can cause: bad input, a run that cannot be used as asked, a
fault in the store or in training that leaves committed data intact.

Every error rayattr raises for something a user can act on derives from RayattrError; the
`rayattr` command prints those as one line and exits 2. Anything else is a bug in rayattr:
the command shows its traceback and exits 1.
"""

from __future__ import annotations


class RayattrError(Exception):
    """Base of every error a user can cause; the message names the object involved."""


class IncompleteInputError(RayattrError):
    """A step of a segment does not hold exactly its record's rows (a missing step, a missing
    rank, a missing kind, or a writer that is still open): the segment is refused rather than
    embedded from part of its input."""
