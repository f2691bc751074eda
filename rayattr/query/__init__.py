"""Answers from a finished run: query texts scored against the stored per-occurrence embeddings.

    run = rayattr.open_run("./rayattr_runs/run-001").run
    result = query_run(run, ["some new input"], k=10, by_source=True)
    result.helpful, result.harmful, result.sources, result.notices
"""

from rayattr.query.errors import QueryError
from rayattr.query.runs import RunNotFinished, require_finished
from rayattr.query.texts import read_query_file

__all__ = ["QueryError", "QueryResult", "OccurrenceScores", "RunNotFinished", "embedding_reader",
           "query_gradients", "query_run", "rank_samples", "rank_sources",
           "read_query_file", "require_finished", "score_occurrences"]

# Scoring needs torch (and the model); loaded on first use so that opening a finished run
# for its tables does not pay for it.
_LAZY = {"QueryResult": "answer", "query_run": "answer", "query_gradients": "gradients",
         "rank_samples": "ranking", "rank_sources": "ranking", "OccurrenceScores": "scoring",
         "embedding_reader": "scoring", "score_occurrences": "scoring"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"rayattr.query.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
