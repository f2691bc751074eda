"""The error `rayattr validate` raises for arguments or runs it cannot validate."""

from rayattr.errors import RayattrError


class ValidationError(RayattrError, ValueError):
    """Bad validation arguments (fraction, source names) or a run that cannot be validated."""
