"""Queries against a real finished run: scores equal a brute-force float64 product, and a
training sample's own text finds that sample first (the paper's self-influence check)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rayattr
from rayattr.query import QueryError, RunNotFinished, query_gradients, query_run, score_occurrences
from rayattr.store import GradientReader, Run


@pytest.fixture(scope="module")
def run(finished_run) -> Run:
    return Run.open_uri(finished_run[1])


def test_scores_equal_brute_force_float64(run):
    texts = ["Return the number of items in the list.", "Open a socket and read until EOF."]
    grads, _ = query_gradients(run, texts)
    occ = score_occurrences(run, grads)
    want, blocks = [], []
    for b in GradientReader(run, kind="embeddings").read_steps(0, None, dtype=torch.float64):
        want.append(sum(b.grads[n] @ grads[n].double().T for n in grads))
        # standard error: sd over the q x q projection blocks stored beside each layer (q = 2)
        est = [sum(b.grads[f"{n}@{i}{j}"] @ (2 * grads[n].double()[:, idx(n, i, j)]).T for n in grads)
               for i in range(2) for j in range(2)]
        blocks.append(torch.stack(est).std(0))
    want = torch.cat(want).numpy()
    assert occ.scores.shape == want.shape == (run.manifest["num_steps"] * run.manifest["global_batch"], 2)
    np.testing.assert_allclose(occ.scores, want, rtol=1e-4, atol=1e-7 * np.abs(want).max())
    se = torch.cat(blocks).numpy()
    np.testing.assert_allclose(occ.se, se, rtol=1e-3, atol=1e-6 * se.max())

    # the stored values are the same scores for the validation set
    vals = run.read_table("values/samples.parquet")
    assert occ.sample_ids.tolist() == vals["sample_id"].to_pylist()


def idx(layer: str, i: int, j: int, r: int = 32, q: int = 2) -> torch.Tensor:
    """Flat positions of block (i, j) of a layer's r x r projected gradient (row-major)."""
    rows = torch.arange(i * r // q, (i + 1) * r // q)
    cols = torch.arange(j * r // q, (j + 1) * r // q)
    return (rows[:, None] * r + cols[None, :]).reshape(-1)


def test_self_influence_ranks_the_sample_first(run):
    train = run.read_table("data/train.parquet")
    ids, texts = train["id"].to_pylist(), train["text"].to_pylist()
    results = query_run(run, texts, k=3, each=True)
    first = [bool(r.helpful) and r.helpful[0]["sample_id"] == i for i, r in zip(ids, results)]
    top3 = [i in [h["sample_id"] for h in r.helpful] for i, r in zip(ids, results)]
    print(f"self-influence: top-1 {np.mean(first):.2f}, top-3 {np.mean(top3):.2f} of {len(ids)} samples")
    assert np.mean(first) > 0.5  # "most samples"
    assert np.mean(top3) > 0.75


def test_ranking_sums_occurrences_and_lists_are_signed(run):
    result = query_run(run, ["Remove and return an item from the queue."], k=5, by_source=True)
    assert 0 < len(result.helpful) <= 5 and 0 < len(result.harmful) <= 5
    assert all(r["score"] > 0 for r in result.helpful) and all(r["score"] < 0 for r in result.harmful)
    assert [r["score"] for r in result.helpful] == sorted((r["score"] for r in result.helpful), reverse=True)
    assert all(r["n_occurrences"] == 2 and r["text"] for r in result.helpful)  # 2 epochs: summed
    assert sum(s["n_samples"] for s in result.sources) == run.read_table("data/train.parquet").num_rows
    scores = [s["score"] for s in result.sources]
    assert scores == sorted(scores, reverse=True)


def test_open_run_api(finished_run):
    r = rayattr.open_run(finished_run[1])
    assert r.sources().num_rows == len(set(r.values()["source"].to_pylist()))
    assert r.phases().num_rows > 0
    answer = r.query("A shallow copy of the dictionary.", k=2)
    assert len(answer.helpful) == 2


def test_errors_name_the_problem(run, finished_run, tmp_path):
    with pytest.raises(QueryError, match="no query texts"):
        query_run(run, [])
    with pytest.raises(QueryError, match="query 1 is empty"):
        query_run(run, ["fine", "   "])
    long = query_run(run, ["word " * 200], k=1)
    assert any("only its first 32 tokens" in n for n in long.notices)
    unfinished = Run.create(str(tmp_path), "busy", {"config": {}})
    unfinished.update_manifest(status="training")
    with pytest.raises(RunNotFinished, match="not finished.*training"):
        rayattr.open_run(unfinished.uri)
