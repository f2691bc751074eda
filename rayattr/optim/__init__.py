"""The optimizer side, below record and train: which optimizer a run trains with (spec), Adam's
state as the capture reads it (adam_state), and global-norm clipping's factor κ_t (clip).

Only the spec is imported here (it needs no torch); adam_state and clip are imported by name.
"""

from rayattr.optim.spec import OptimizerSpec, check_param_groups, resolve_optimizer

__all__ = ["OptimizerSpec", "check_param_groups", "resolve_optimizer"]
