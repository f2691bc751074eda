"""rayattr.store: the streaming gradient store (fsspec + pyarrow; local files and S3).

Training ranks stream projected per-sample gradients through GradientWriter; segment actors
read any step range back with GradientReader. Layout and commit protocol: docs/store.md.
"""

from .errors import StoreError
from .fs import open_store_fs
from .options import StoreOptions
from .reader import GradientReader, StepBatch
from .records import StepRecord
from .run import Run, list_runs
from .writer import GradientWriter

__all__ = ["StoreOptions", "open_store_fs", "Run", "list_runs", "GradientWriter",
           "GradientReader", "StepBatch", "StepRecord", "StoreError"]
