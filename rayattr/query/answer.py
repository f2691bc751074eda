"""A query end to end: texts -> test gradients -> streamed scores -> ranked samples and sources."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from rayattr.query.errors import QueryError
from rayattr.query.gradients import query_gradients
from rayattr.query.ranking import TextLookup, rank_samples, rank_sources
from rayattr.query.runs import require_finished
from rayattr.query.scoring import OccurrenceScores, score_occurrences
from rayattr.store import Run


@dataclass
class QueryResult:
    """The answer for one query (or one set of texts scored together)."""

    texts: list[str]
    helpful: list[dict] = field(default_factory=list)
    """Rows {sample_id, source, step, score, se, within_noise, text, n_occurrences}, most helpful
    first; se is the projection's standard error of the score (None for runs without blocks)."""
    harmful: list[dict] = field(default_factory=list)
    """Same rows, most harmful (most negative score) first."""
    sources: list[dict] | None = None
    """With by_source: {source, score, n_samples, n_occurrences, score_per_sample}, best first."""
    notices: list[str] = field(default_factory=list)
    """Things the user should know (e.g. a text truncated to the model's context)."""

    def to_dict(self) -> dict:
        out = {"helpful": self.helpful, "harmful": self.harmful}
        if self.sources is not None:
            out["sources"] = self.sources
        return out


def answer(occ: OccurrenceScores, column: np.ndarray, texts: list[str], k: int, by_source: bool,
           texts_of: TextLookup | None, notices: list[str], se: np.ndarray | None = None) -> QueryResult:
    ranked = rank_samples(occ, column, k, texts_of, se=se)
    return QueryResult(texts=texts, helpful=ranked["helpful"], harmful=ranked["harmful"],
                       sources=rank_sources(occ, column) if by_source else None, notices=notices)


def keep_sources(occ: OccurrenceScores, sources: list[str]) -> OccurrenceScores:
    """Only the occurrences of training samples from `sources`."""
    return occ.subset(np.isin(occ.sources.astype(str), list(sources)))


def check_sources(known: list[str], sources: list[str]) -> None:
    """QueryError naming the sources the run does not have, and the ones it does."""
    unknown = [s for s in sources if s not in set(known)]
    if unknown:
        raise QueryError(f"unknown source(s) {unknown}: the run trained on sources {sorted(known)}")


def run_texts(run: Run) -> TextLookup:
    """Texts of training sample ids, fetched from the run's data by id (data/run_data.py)."""
    from rayattr.data.run_data import texts_by_id

    def lookup(ids: np.ndarray) -> list:
        found = texts_by_id(run, ids)
        return [found.get(int(i)) for i in ids]
    return lookup


def query_run(run: Run, texts: list[str], k: int = 10, each: bool = False, by_source: bool = False,
              model: torch.nn.Module | None = None, sources: list[str] | None = None,
              progress: Callable[[str], None] | None = None) -> QueryResult | list[QueryResult]:
    """Most helpful / harmful training samples for `texts`.

    Together (default): the texts are one test set, scored by its mean loss (the mean of
    their gradients, as the run's validation values are). each=True: one result per text,
    all scored in the same single pass over the embeddings. sources: rank only training
    samples of these sources. progress: called with a line before each slow stage.
    """
    say = progress or (lambda _msg: None)
    require_finished(run)
    train = run_texts(run)
    if sources:
        from rayattr.data.run_data import token_meta

        check_sources(token_meta(run)["sources"], sources)  # before the slow part
    say(f"loading the final model; test gradients of {len(texts)} text(s)")
    grads, notices = query_gradients(run, texts, model=model)
    if not each:
        grads = {n: g.double().mean(0, keepdim=True) for n, g in grads.items()}
    say("scoring the stored per-occurrence embeddings")
    occ = score_occurrences(run, grads)
    if sources:
        occ = keep_sources(occ, sources)
    say(f"ranking {len(occ)} occurrences")
    if not each:
        return answer(occ, occ.scores[:, 0], list(texts), k, by_source, train, [n.message for n in notices],
                      se=_column(occ.se, 0))
    return [answer(occ, occ.scores[:, i], [t], k, by_source, train,
                   [n.message for n in notices if n.query == i], se=_column(occ.se, i)) for i, t in enumerate(texts)]


def _column(se: np.ndarray | None, i: int) -> np.ndarray | None:
    return None if se is None else se[:, i]
