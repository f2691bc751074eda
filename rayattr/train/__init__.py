"""DeepSpeed ranks under Ray Train: worker (one rank's loop), backend (process group, DS config), trainer (driver).

Names are imported on first use: rayattr.record (which the worker trains through) imports
train.engine and train.adam_state, and must not pull in Ray's actors to do so.
"""

_NAMES = {"build_model": "rayattr.train.model", "train": "rayattr.train.trainer",
          "NonFiniteLoss": "rayattr.record.errors",
          "RankWorker": "rayattr.train.worker"}

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name not in _NAMES:
        raise AttributeError(f"module 'rayattr.train' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_NAMES[name]), name)
