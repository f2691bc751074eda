"""Numbers for people: the one formatting of byte counts (plan, `rayattr gc`, `rayattr show`)."""


def human_bytes(b: float) -> str:
    """1234567 -> '1.23 MB': three significant digits in decimal units, as object stores bill."""
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"
