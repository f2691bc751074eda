"""Honest version floors: ray at least the release with CheckpointConsistencyMode (used by
train/checkpoints.py); DeepSpeed bounded above, since optim/adam_state.py reads its internals."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def spec(name: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (line,) = [d for d in deps if re.match(rf"{re.escape(name)}(\[|[<>=!~ ]|$)", d)]
    return line


def version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def test_ray_floor_has_checkpoint_consistency_mode():
    floor = re.search(r">=\s*([\d.]+)", spec("ray")).group(1)
    assert version(floor) >= (2, 52), spec("ray")
    import ray
    import ray.train

    assert version(ray.__version__.split("rc")[0].split("dev")[0].rstrip(".")) >= version(floor)
    assert hasattr(ray.train, "CheckpointConsistencyMode")


def test_deepspeed_is_bounded_above():
    assert "<" in spec("deepspeed"), spec("deepspeed")
