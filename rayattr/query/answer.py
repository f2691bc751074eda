"""A query end to end: texts -> test gradients -> streamed scores -> ranked samples and sources.

The occurrences' scores are ranked as they stream (query/ranking.py, Ranking): a query holds
a bounded amount of memory however many occurrences the run has."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from rayattr.query.errors import QueryError
from rayattr.query.gradients import query_gradients
from rayattr.query.ranking import Ranking, TextLookup
from rayattr.query.runs import require_finished
from rayattr.query.scoring import OccurrenceScores, embedding_reader, score_blocks, stored_blocks
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
    lists = rank_run(run, grads, k, by_source=by_source, sources=sources, texts_of=train, progress=say)
    results = [QueryResult(texts=[t] if each else list(texts), helpful=c["helpful"], harmful=c["harmful"],
                           sources=c["sources"], notices=[n.message for n in notices if not each or n.query == i])
               for i, (t, c) in enumerate(zip(texts if each else [None], lists))]
    return results if each else results[0]


def rank_run(run: Run, grads: dict[str, torch.Tensor], k: int, by_source: bool = False,
             sources: list[str] | None = None, texts_of: TextLookup | None = None,
             progress: Callable[[str], None] | None = None, block_rows: int = 1024,
             part_bytes: int | None = None) -> list[dict]:
    """Per query gradient (row of each layer's (Q, p)): {"helpful", "harmful", "sources"},
    ranked from the run's final embeddings as they stream (sources: only occurrences of
    training samples from these sources)."""
    say = progress or (lambda _msg: None)
    reader = embedding_reader(run)
    rows = reader.rows()
    g = next(iter(grads.values()))
    q = g.shape[0] if g.ndim == 2 else 1
    with_se = stored_blocks(run, reader).enabled
    extra = {} if part_bytes is None else {"part_bytes": part_bytes}
    with Ranking(q, k, rows, with_se, by_source=by_source, **extra) as ranking:
        for block in score_blocks(run, grads, block_rows, reader):
            if sources:
                block = keep_sources(block, sources)
            ranking.add(block)
        say(f"ranking {ranking.occurrences} occurrences")
        return ranking.finish(texts_of)

