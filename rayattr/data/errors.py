"""The one exception type the data layer raises for bad input."""

from rayattr.errors import RayattrError


class DataError(RayattrError, ValueError):
    """A dataset, tokenizer spec or batching request that cannot be used as given.

    Subclasses ValueError so callers that only know "bad value" still catch it; the
    message always names the offending file/column/ids/argument.
    """
