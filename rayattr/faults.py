"""Fault injection for the fault-tolerance tests: kill this process at a named point, once.

Off unless `RAYATTR_FAULT` is set, e.g. `RAYATTR_FAULT="rank.step:rank=1,step=9"`: the
process that reaches point `rank.step` with rank 1 at step >= 9 dies with os._exit (no
cleanup, like a node loss). `RAYATTR_FAULT_DIR` names a directory where a marker records
that the fault fired, so a restarted process goes on instead of dying again. Points that do
something other than dying (`rank.nan`: one rank's loss turns NaN) ask `triggered`.
"""

from __future__ import annotations

import os

ENV, DIR_ENV = "RAYATTR_FAULT", "RAYATTR_FAULT_DIR"


def _parse(spec: str) -> tuple[str, dict[str, int]]:
    point, _, args = spec.partition(":")
    conds = {}
    for item in filter(None, args.split(",")):
        key, _, value = item.partition("=")
        conds[key.strip()] = int(value)
    return point.strip(), conds


def triggered(point: str, **at: int) -> bool:
    """True, once, if the configured fault names this point and its conditions hold.

    A condition on `step` fires at the first step at or after it; others must match exactly.
    """
    spec = os.environ.get(ENV)
    if not spec:
        return False
    want, conds = _parse(spec)
    if want != point:
        return False
    for key, value in conds.items():
        have = at.get(key)
        if have is None or (have < value if key == "step" else have != value):
            return False
    marker = os.path.join(os.environ.get(DIR_ENV, "."), f"fault-fired-{point}")
    if os.path.exists(marker):
        return False
    with open(marker, "w") as f:
        f.write(repr(at))
    return True


def maybe_fail(point: str, **at: int) -> None:
    """Die here (os._exit, no clean-up) if the configured fault names this point."""
    if triggered(point, **at):
        os._exit(17)


def fired(directory: str, point: str) -> bool:
    """Whether the fault at `point` fired (for tests)."""
    return os.path.exists(os.path.join(directory, f"fault-fired-{point}"))
