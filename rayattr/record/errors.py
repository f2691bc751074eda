"""Errors a recording raises to its caller."""

from rayattr.errors import RayattrError


class NonFiniteLoss(RayattrError, RuntimeError):
    """Training produced a NaN/inf loss; what was committed so far stays readable."""
