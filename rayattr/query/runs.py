"""Opening runs for answering: only finished runs have values and embeddings to read."""

from __future__ import annotations

from rayattr.query.errors import QueryError
from rayattr.store import Run, StoreOptions, open_run_ref


class RunNotFinished(QueryError):
    """The run exists but its pipeline has not finished (or failed): no values yet."""


def require_finished(run: Run) -> Run:
    """The run itself, or RunNotFinished naming its status."""
    status = run.manifest.get("status", "unknown")
    if status == "recorded":
        raise RunNotFinished(f"run '{run.run_id}' at {run.uri} is recorded but not attributed yet: "
                             f"run `rayattr attribute {run.uri}` to compute its values")
    if status != "done":
        raise RunNotFinished(f"run '{run.run_id}' at {run.uri} is not finished (status '{status}'); "
                             "values, queries and reports need a run whose pipeline completed")
    return run


def open_finished(uri: str, storage_options: dict | None = None) -> Run:
    """Open a run by its URI (local path, file:// or s3://) or its bare id in the default store
    ($RAYATTR_STORE, else ./rayattr_runs) read-only and check it finished.

    StoreError for an unknown run (it lists the runs that exist), RunNotFinished for one
    still running or abandoned.
    """
    options = StoreOptions(storage_options=dict(storage_options or {}))
    return require_finished(open_run_ref(str(uri), options=options, readonly=True))
