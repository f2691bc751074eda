"""The error `rayattr validate` raises for arguments or runs it cannot validate."""


class ValidationError(ValueError):
    """Bad validation arguments (fraction, source names) or a run that cannot be validated."""
