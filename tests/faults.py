"""Fault injection for the fault-tolerance tests: act at a named test seam of rayattr.hooks, once.

test_faults.py runs the job with tests/faultsite on PYTHONPATH and the fault in
RAYATTR_TEST_FAULT, e.g. "rank.step:rank=1,step=9": faultsite/sitecustomize.py, which every
Python process of that job (driver, Ray workers) loads at start-up, calls install(), and the
process that reaches seam `rank.step` with rank 1 at step >= 9 dies with os._exit (no
clean-up, like a node loss). A marker file in RAYATTR_TEST_FAULT_DIR records that the fault
fired, so a restarted process goes on instead of dying again. `rank.nan` turns one rank's
loss NaN at seam `rank.loss`. Outside these tests nothing reads these variables.
"""

from __future__ import annotations

import os

ENV, DIR_ENV = "RAYATTR_TEST_FAULT", "RAYATTR_TEST_FAULT_DIR"
SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faultsite")


def parse(spec: str) -> tuple[str, dict[str, int]]:
    point, _, args = spec.partition(":")
    conds = {}
    for item in filter(None, args.split(",")):
        key, _, value = item.partition("=")
        conds[key.strip()] = int(value)
    return point.strip(), conds


def _fires(directory: str, point: str, conds: dict[str, int], at: dict) -> bool:
    """True, once, if the conditions hold: `step` fires at the first step at or after it;
    others must match exactly."""
    for key, value in conds.items():
        have = at.get(key)
        if have is None or (have < value if key == "step" else have != value):
            return False
    marker = os.path.join(directory, f"fault-fired-{point}")
    if os.path.exists(marker):
        return False
    with open(marker, "w") as f:
        f.write(repr(at))
    return True


def install(spec: str, directory: str) -> None:
    """Register the fault `spec` at its seam in this process."""
    from rayattr import hooks

    point, conds = parse(spec)
    if point == "rank.nan":  # one rank's loss diverges alone
        hooks.register("rank.loss", lambda loss, **at: loss * float("nan")
                       if _fires(directory, point, conds, at) else loss)
    elif point in ("rank.step", "driver.train", "segment.compute"):
        def die(**at):
            if _fires(directory, point, conds, at):
                os._exit(17)
        hooks.register(point, die)
    else:
        raise ValueError(f"unknown fault point {point!r}")


def env(spec: str, directory: str) -> dict[str, str]:
    """Variables that make a job subprocess (and its Ray workers) install `spec`."""
    path = os.pathsep.join(p for p in (SITE, os.environ.get("PYTHONPATH")) if p)
    return {ENV: spec, DIR_ENV: directory, "PYTHONPATH": path}


def fired(directory: str, point: str) -> bool:
    """Whether the fault at `point` fired."""
    return os.path.exists(os.path.join(directory, f"fault-fired-{point}"))
