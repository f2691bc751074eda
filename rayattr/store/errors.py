"""The one exception type the store raises for anything a caller can act on."""

from rayattr.errors import RayattrError


class StoreError(RayattrError, RuntimeError):
    """A store operation failed: bad URI, credentials, missing run, corrupt shard, bad input.

    The message always names the object involved (URI, run, shard or layer) and never
    contains credentials.
    """
