"""Answers from a finished run: query texts scored against the stored per-occurrence embeddings.

    run = open_finished("./rayattr_runs/run-001")
    result = query_run(run, ["some new input"], k=10, by_source=True)
    result.helpful, result.harmful, result.sources, result.notices
"""

from rayattr.query.answer import QueryResult, query_run
from rayattr.query.errors import QueryError
from rayattr.query.gradients import query_gradients
from rayattr.query.ranking import rank_samples, rank_sources
from rayattr.query.runs import RunNotFinished, open_finished, require_finished
from rayattr.query.scoring import OccurrenceScores, embedding_reader, score_occurrences
from rayattr.query.texts import read_query_file

__all__ = ["QueryError", "QueryResult", "OccurrenceScores", "RunNotFinished", "embedding_reader",
           "open_finished", "query_gradients", "query_run", "rank_samples", "rank_sources",
           "read_query_file", "require_finished", "score_occurrences"]
