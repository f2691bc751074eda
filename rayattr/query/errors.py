"""The exception the query and answer layer raises for requests it cannot serve."""

from rayattr.errors import RayattrError


class QueryError(RayattrError, ValueError):
    """A query that cannot be answered as asked (empty input, a run without embeddings...).

    The message names what is wrong and, where there is one, what to do instead.
    """
