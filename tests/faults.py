"""Fault injection for the fault-tolerance tests: act at a named test seam of rayattr.runtime.hooks, once.

test_faults.py runs the job with tests/faultsite on PYTHONPATH and the faults in
RAYATTR_TEST_FAULT, e.g. "rank.step:rank=1,step=9" (several joined by ";" act in one run, each
once): faultsite/sitecustomize.py, which every
Python process of that job (driver, Ray workers) loads at start-up, calls install(), and the
process that reaches seam `rank.step` with rank 1 at step >= 9 dies with os._exit (no
clean-up, like a node loss). A marker file in RAYATTR_TEST_FAULT_DIR records that the fault
fired, so a restarted process goes on instead of dying again. `rank.nan` turns one rank's
loss NaN at seam `rank.loss`. "ray.train.report" injects nothing: from its first step on, each
rank appends every call it makes to ray.train.report to reports.jsonl in that directory
(`reports`). Outside these tests nothing reads these variables.
"""

from __future__ import annotations

import functools
import json
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


def install(specs: str, directory: str) -> None:
    """Register each fault of `specs` ("point:k=v,...;point:...") at its seam in this process."""
    for spec in filter(None, (s.strip() for s in specs.split(";"))):
        _install(spec, directory)


def _install(spec: str, directory: str) -> None:
    from rayattr.runtime import hooks

    point, conds = parse(spec)
    if point == "rank.nan":  # one rank's loss diverges alone
        hooks.register("rank.loss", lambda loss, **at: loss * float("nan")
                       if _fires(directory, point, conds, at) else loss)
    elif point in ("rank.step", "driver.train", "segment.compute"):
        def die(**at):
            if _fires(directory, point, conds, at):
                os._exit(17)
        hooks.register(point, die)
    elif point == "ray.train.report":
        hooks.register("rank.step", functools.partial(_record_reports, os.path.join(directory, REPORTS)))
    else:
        raise ValueError(f"unknown fault point {point!r}")


REPORTS = "reports.jsonl"


def _record_reports(path: str, rank: int, step: int) -> None:
    """At a rank's first step: wrap ray.train.report in this process to append each call."""
    import ray.train

    report = ray.train.report
    if getattr(report, "recorded", False):
        return

    def recorded(metrics, checkpoint=None, **kwargs):
        with open(path, "a") as f:
            f.write(json.dumps({"rank": rank, "step": metrics.get("step"), "checkpoint": checkpoint is not None}) + "\n")
        return report(metrics, checkpoint=checkpoint, **kwargs)

    recorded.recorded = True
    ray.train.report = recorded


def reports(directory: str) -> list[dict]:
    """The ray.train.report calls the ranks made, in order per rank."""
    path = os.path.join(directory, REPORTS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def env(spec: str, directory: str) -> dict[str, str]:
    """Variables that make a job subprocess (and its Ray workers) install `spec`."""
    path = os.pathsep.join(p for p in (SITE, os.environ.get("PYTHONPATH")) if p)
    return {ENV: spec, DIR_ENV: directory, "PYTHONPATH": path}


def fired(directory: str, point: str) -> bool:
    """Whether the fault at `point` fired."""
    return os.path.exists(os.path.join(directory, f"fault-fired-{point}"))
