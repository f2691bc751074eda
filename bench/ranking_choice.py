#!/usr/bin/env python
"""Rank samples by value or by value/SE? The two measurements behind the choice (docs/answers.md).

    python bench/ranking_choice.py RUN [--queries 64] [--k 10]

1. Self-influence: each of --queries training texts (drawn from the clean sources, seeded) is
   queried alone; how often is the text itself the most helpful sample (top-1), ranked by the
   summed value and by value/SE?
2. The report's lists: which source the first of the k most helpful samples of the whole run
   comes from (the sample totals of values/samples.parquet), how many corrupted texts reach
   the k, and how many of those k are within noise (|value| < 2 SE).
Three rankings: by value; by value with the rows clear of noise first (what rayattr shows);
by value/SE.
"""

from __future__ import annotations

import argparse

import numpy as np


RANKINGS = ("value", "value, clear first", "value/SE")


def ranked(values: np.ndarray, se: np.ndarray, by: str, k: int) -> np.ndarray:
    """The k best indices, best first: by the value; by the value with the rows clear of noise
    (|value| >= 2 SE) moved before the rest (what rayattr shows); or by value/SE."""
    if by == "value/SE":
        return np.argsort(-np.divide(values, se, out=np.sign(values) * np.inf, where=se > 0), kind="stable")[:k]
    top = np.argsort(-values, kind="stable")[:k]
    if by == "value":
        return top
    clear = np.abs(values[top]) >= 2 * se[top]
    return np.concatenate([top[clear], top[~clear]])


def self_influence(run, n: int, seed: int) -> dict[str, float]:
    from rayattr.data.run_data import texts_by_id
    from rayattr.query import query_gradients, score_occurrences
    from rayattr.query.ranking import sample_totals

    samples = run.read_table("values/samples.parquet")
    clean = np.unique(samples.filter(samples["source"].to_numpy(zero_copy_only=False) != "corrupted")["sample_id"]
                      .to_numpy())
    ids = np.random.default_rng(seed).choice(clean, size=min(n, len(clean)), replace=False)
    texts = texts_by_id(run, ids)
    grads, _ = query_gradients(run, [texts[int(i)] for i in ids])
    occ = score_occurrences(run, grads)
    hits = dict.fromkeys(RANKINGS, 0)
    for q, sid in enumerate(ids):
        uniq, totals, inverse = sample_totals(occ.sample_ids, occ.scores[:, q])
        se = np.sqrt(np.bincount(inverse, weights=occ.se[:, q] ** 2, minlength=len(uniq)))
        for by in hits:
            hits[by] += int(uniq[ranked(totals, se, by, 10)[0]] == sid)
    return {by: h / len(ids) for by, h in hits.items()}


def report_lists(run, k: int) -> dict[str, dict[str, int]]:
    from rayattr.report.html import SampleTotals, scan_samples

    sums = SampleTotals()
    for batch in scan_samples(run):
        sums.add(batch)
    t = sums.table().to_pylist()
    values = np.array([r["value"] for r in t])
    se = np.sqrt(np.array([r["se2"] for r in t]))
    sources = np.array([r["source"] for r in t])
    out = {}
    for by in RANKINGS:
        top = ranked(values, se, by, k)
        noisy = np.abs(values[top]) < 2 * se[top]
        out[by] = {"first": str(sources[top[0]]), "corrupted": int(np.sum(sources[top] == "corrupted")),
                   "within_noise": int(np.sum(noisy))}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from rayattr.store import StoreOptions, open_run_ref

    run = open_run_ref(args.run, StoreOptions())
    top1 = self_influence(run, args.queries, args.seed)
    lists = report_lists(run, args.k)
    print(f"run {run.run_id}: {args.queries} self-queries, k = {args.k}")
    print(f"{'ranked by':<20}{'self top-1':>11}{'first helpful':>15}{'corrupted in top k':>20}"
          f"{'within noise in top k':>23}")
    for by in RANKINGS:
        print(f"{by:<20}{top1[by]:>11.0%}{lists[by]['first']:>15}{lists[by]['corrupted']:>20}"
              f"{lists[by]['within_noise']:>23}")


if __name__ == "__main__":
    main()
