"""How `rayattr exact` spaces its checkpoints, without importing the replay."""

from __future__ import annotations

import math


def default_every(num_steps: int) -> int:
    """A checkpoint every ⌈√T⌉ steps: the checkpoints and one segment's graph then weigh alike."""
    return max(1, math.ceil(math.sqrt(num_steps)))


def checkpoint_bytes(num_params: int, num_steps: int, every: int, adamw: bool) -> int:
    """θ (and Adam's m and v) in float64 at every checkpoint: the part of the reverse pass's
    memory that grows with the run's steps (as √T at the default spacing)."""
    return math.ceil(num_steps / every) * (3 if adamw else 1) * num_params * 8
