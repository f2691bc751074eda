"""Only finished runs have values and embeddings to read: the check every reader makes."""

from __future__ import annotations

from rayattr.query.errors import QueryError
from rayattr.store import Run


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

