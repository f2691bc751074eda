"""Errors a recording raises to its caller."""


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss; what was committed so far stays readable."""
