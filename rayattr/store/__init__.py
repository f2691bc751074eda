"""rayattr.store: the streaming gradient store (fsspec + pyarrow; local files and S3).

Training ranks stream projected per-sample gradients through GradientWriter; segment actors
read any step range back with GradientReader. Layout and commit protocol: docs/store.md.
"""

from .errors import StoreError
from .fs import open_store_fs
from .names import default_store, open_run_ref, resolve_run_uri
from .options import StoreOptions
from .records import StepRecord
from .run import Run, list_runs

__all__ = ["StoreOptions", "open_store_fs", "Run", "list_runs", "GradientWriter",
           "GradientReader", "StepBatch", "StepRecord", "StoreError",
           "default_store", "open_run_ref", "resolve_run_uri"]

# The gradient reader and writer need torch; loaded on first use so that reading a run's
# manifest and tables (the `rayattr runs/values/show` commands) starts without it.
_LAZY = {"GradientReader": ".reader", "StepBatch": ".reader", "GradientWriter": ".writer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
