"""From per-occurrence scores to answers: samples ranked by their summed value, sources ranked."""

from __future__ import annotations

from typing import Callable

import numpy as np

from rayattr.query.scoring import OccurrenceScores


def sample_totals(sample_ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct sample ids, their value summed over occurrences, and each occurrence's sample index."""
    ids, inverse = np.unique(sample_ids, return_inverse=True)
    return ids, np.bincount(inverse, weights=scores, minlength=len(ids)), inverse


def _top(values: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Indices of the k largest (or smallest) values, best first; only strictly positive
    (negative) ones, so a "helpful" answer never lists a sample that hurt."""
    keep = np.flatnonzero(values > 0 if largest else values < 0)
    if keep.size == 0 or k <= 0:
        return keep[:0]
    order = np.argsort(-values[keep] if largest else values[keep], kind="stable")
    return keep[order[:k]]


TextLookup = Callable[[np.ndarray], list]
"""Texts of the given training sample ids, in their order (None where unknown)."""


def rank_samples(occ: OccurrenceScores, column: np.ndarray, k: int,
                 texts: TextLookup | None = None, se: np.ndarray | None = None) -> dict[str, list[dict]]:
    """The k most helpful and k most harmful training samples for one score column.

    A sample's score is its value summed over its occurrences (all epochs); `step` is the
    occurrence that contributed most in the row's direction. With `se` (per occurrence), a
    row's se adds its occurrences' in quadrature, and within_noise says |score| < 2·se.
    """
    ids, totals, inverse = sample_totals(occ.sample_ids, column)
    out: dict[str, list[dict]] = {}
    for key, largest in (("helpful", True), ("harmful", False)):
        rows = []
        for j in _top(totals, k, largest):
            mine = np.flatnonzero(inverse == j)
            best = mine[np.argmax(column[mine]) if largest else np.argmin(column[mine])]
            row_se = float(np.sqrt(np.sum(se[mine] ** 2))) if se is not None else None
            rows.append({"sample_id": int(ids[j]), "source": str(occ.sources[best]),
                         "step": int(occ.steps[best]), "score": float(totals[j]), "se": row_se,
                         "within_noise": None if row_se is None else bool(abs(totals[j]) < 2 * row_se),
                         "n_occurrences": int(mine.size)})
        if texts is not None and rows:  # only the rows shown are fetched
            for row, text in zip(rows, texts(np.array([r["sample_id"] for r in rows]))):
                row["text"] = text
        out[key] = rows
    return out


def rank_sources(occ: OccurrenceScores, column: np.ndarray) -> list[dict]:
    """Sources ranked by their summed score for one column (most helpful first)."""
    names, inverse = np.unique(occ.sources.astype(str), return_inverse=True)
    totals = np.bincount(inverse, weights=column, minlength=len(names))
    n_occ = np.bincount(inverse, minlength=len(names))
    n_samples = [len(np.unique(occ.sample_ids[inverse == i])) for i in range(len(names))]
    rows = [{"source": str(names[i]), "score": float(totals[i]), "n_samples": int(n_samples[i]),
             "n_occurrences": int(n_occ[i]), "score_per_sample": float(totals[i] / max(1, n_samples[i]))}
            for i in range(len(names))]
    return sorted(rows, key=lambda r: -r["score"])
