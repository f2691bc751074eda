"""`rayattr query` ranks the occurrences as they stream (query/ranking.py, Ranking) in bounded
memory: its lists equal, bit for bit, what the old ranking gave with every occurrence in
memory (copied below and run by brute force in float64), with the occurrences cut into
partitions spilled to disk, fed in small blocks, with exact ties, and with samples whose
occurrences lie in different blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayattr.embed.blocks import ProjectionBlocks
from rayattr.store.layout import FINAL_KIND
from rayattr.query.answer import rank_run
from rayattr.query.ranking import Ranking, rank_samples, rank_sources
from rayattr.query.scoring import OccurrenceScores, concat, score_blocks, score_occurrences
from rayattr.store import GradientWriter, Run


# -- the ranking before it streamed: every occurrence's id, source, step and score in memory --

def old_sample_totals(sample_ids, scores):
    ids, inverse = np.unique(sample_ids, return_inverse=True)
    return ids, np.bincount(inverse, weights=scores, minlength=len(ids)), inverse


def old_top(values, k, largest):
    keep = np.flatnonzero(values > 0 if largest else values < 0)
    if keep.size == 0 or k <= 0:
        return keep[:0]
    order = np.argsort(-values[keep] if largest else values[keep], kind="stable")
    return keep[order[:k]]


def old_rank_samples(occ, column, k, texts=None, se=None):
    ids, totals, inverse = old_sample_totals(occ.sample_ids, column)
    out = {}
    for key, largest in (("helpful", True), ("harmful", False)):
        rows = []
        for j in old_top(totals, k, largest):
            mine = np.flatnonzero(inverse == j)
            best = mine[np.argmax(column[mine]) if largest else np.argmin(column[mine])]
            row_se = float(np.sqrt(np.sum(se[mine] ** 2))) if se is not None else None
            rows.append({"sample_id": int(ids[j]), "source": str(occ.sources[best]),
                         "step": int(occ.steps[best]), "score": float(totals[j]), "se": row_se,
                         "within_noise": None if row_se is None else bool(abs(totals[j]) < 2 * row_se),
                         "n_occurrences": int(mine.size)})
        if texts is not None and rows:
            for row, text in zip(rows, texts(np.array([r["sample_id"] for r in rows]))):
                row["text"] = text
        out[key] = rows
    return out


def old_rank_sources(occ, column):
    names, inverse = np.unique(occ.sources.astype(str), return_inverse=True)
    totals = np.bincount(inverse, weights=column, minlength=len(names))
    n_occ = np.bincount(inverse, minlength=len(names))
    n_samples = [len(np.unique(occ.sample_ids[inverse == i])) for i in range(len(names))]
    rows = [{"source": str(names[i]), "score": float(totals[i]), "n_samples": int(n_samples[i]),
             "n_occurrences": int(n_occ[i]), "score_per_sample": float(totals[i] / max(1, n_samples[i]))}
            for i in range(len(names))]
    return sorted(rows, key=lambda r: -r["score"])


def old_answers(occ, k, by_source, texts=None, sources=None):
    """Per column, what query_run answered before: the source filter, then the two lists."""
    if sources:
        occ = occ.subset(np.isin(occ.sources.astype(str), list(sources)))
    out = []
    for c in range(occ.scores.shape[1]):
        se = None if occ.se is None else occ.se[:, c]
        lists = old_rank_samples(occ, occ.scores[:, c], k, texts, se)
        lists["sources"] = old_rank_sources(occ, occ.scores[:, c]) if by_source else None
        out.append(lists)
    return out


def texts_of(ids):
    return [f"text of {int(i)}" if int(i) % 3 else None for i in ids]


# -- synthetic occurrences --------------------------------------------------------------------

def occurrences(seed=0, samples=300, epochs=3, columns=2, batch=8) -> OccurrenceScores:
    """Every sample once per epoch, in a new order each epoch; scores with exact ties (pairs of
    samples with the same scores in every epoch) and samples whose total outranks their
    occurrences (many small scores of one sign, spread over the epochs)."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(10 ** 12, size=samples, replace=False) - 10 ** 11  # some negative
    source = rng.choice(np.array(["web", "code", "books & more"], dtype=object), size=samples)
    per = rng.normal(size=(samples, epochs, columns))
    per[::7] = np.abs(per[::7]) * 0.9  # steady helpers
    per[3::11] = -np.abs(per[3::11]) * 0.9  # steady harmers
    per[1::5] = per[2::5][:len(per[1::5])]  # ties: the same scores in every epoch
    per[10, :, :] = 2.0  # a tie at the very top: samples 10 and 11 equal
    per[11, :, :] = 2.0
    per[20, :, :] = -2.0
    per[21, :, :] = -2.0
    se = np.abs(rng.normal(size=(samples, epochs, columns))) * 0.5
    se[::4] *= 10  # some listed rows are within noise
    order = np.concatenate([rng.permutation(samples) for _ in range(epochs)])
    epoch = np.repeat(np.arange(epochs), samples)
    return OccurrenceScores(ids[order], source[order], np.arange(len(order)) // batch,
                            per[order, epoch], se[order, epoch])


def blocks_of(occ: OccurrenceScores, rng, largest=50):
    """Consecutive occurrences in blocks of random sizes."""
    cuts = np.cumsum(rng.integers(1, largest, size=len(occ)))
    cuts = cuts[cuts < len(occ)]
    return [occ.subset(np.arange(a, b)) for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(occ)])]


def streamed(occ: OccurrenceScores, k, by_source, blocks, tmp_path=None, texts=texts_of, **kw):
    with Ranking(occ.scores.shape[1], k, len(occ), occ.se is not None, by_source=by_source,
                 tmp_dir=None if tmp_path is None else str(tmp_path), **kw) as ranking:
        for b in blocks:
            ranking.add(b)
        assert ranking.occurrences == len(occ)
        return ranking.finish(texts), ranking.parts


@pytest.mark.parametrize("k", [1, 5, 12, 10 ** 6])
def test_streamed_lists_equal_the_old_ranking_bit_for_bit(k, tmp_path):
    occ = occurrences()
    want = old_answers(occ, k, by_source=True, texts=texts_of)
    rng = np.random.default_rng(1)
    # one partition in memory; then many spilled to files, flushed many times
    for kw in ({}, {"part_bytes": 2000, "spill_buffer": 3000}):
        got, parts = streamed(occ, k, True, blocks_of(occ, rng), tmp_path, **kw)
        assert (parts > 10) == bool(kw)
        assert got == want  # dicts of ints, strings and floats compared exactly
    assert not list(tmp_path.iterdir())  # the spilled partitions are gone
    if k == 12:  # what the comparison covers: exact ties, rows within noise, summed epochs
        for key in ("helpful", "harmful"):
            rows = want[0][key]
            ties = [(a, b) for a, b in zip(rows, rows[1:]) if a["score"] == b["score"]]
            assert ties and all(a["sample_id"] < b["sample_id"] for a, b in ties)
            assert {r["within_noise"] for r in rows} == {True, False}
            assert all(r["n_occurrences"] == 3 for r in rows)
        # ... and ranking each block on its own would list other samples
        per_block = sorted((r for b in blocks_of(occ, rng) for r in old_rank_samples(b, b.scores[:, 0], k)["helpful"]),
                           key=lambda r: (-r["score"], r["sample_id"]))[:k]
        assert [r["sample_id"] for r in per_block] != [r["sample_id"] for r in want[0]["helpful"]]


def test_many_epochs(tmp_path):
    """12 occurrences a sample: a row's se is np.sum's (pairwise from 8 terms on), as before."""
    occ = occurrences(seed=8, samples=60, epochs=12, columns=1, batch=4)
    got, parts = streamed(occ, 10 ** 6, True, blocks_of(occ, np.random.default_rng(9), 9), tmp_path,
                          part_bytes=3000, spill_buffer=2000)
    assert parts > 5 and got == old_answers(occ, 10 ** 6, by_source=True, texts=texts_of)

def test_in_memory_functions_are_the_stream_on_one_block():
    occ = occurrences(seed=3, columns=1)
    column, se = occ.scores[:, 0], occ.se[:, 0]
    assert rank_samples(occ, column, 7, texts_of, se=se) == old_rank_samples(occ, column, 7, texts_of, se)
    assert rank_samples(occ, column, 7) == old_rank_samples(occ, column, 7)
    assert rank_sources(occ, column) == old_rank_sources(occ, column)


def test_no_occurrences_and_no_standard_errors(tmp_path):
    occ = occurrences(seed=4, columns=1)
    occ.se = None
    got, _ = streamed(occ, 4, True, blocks_of(occ, np.random.default_rng(5)), tmp_path, part_bytes=500)
    assert got == old_answers(occ, 4, by_source=True, texts=texts_of)
    assert got[0]["helpful"][0]["se"] is None and got[0]["helpful"][0]["within_noise"] is None
    empty = occ.subset(np.zeros(len(occ), bool))
    assert streamed(empty, 4, True, [], tmp_path, part_bytes=500)[0] == \
        [{"helpful": [], "harmful": [], "sources": []}]


def test_spilled_partitions_are_removed_when_the_stream_fails(tmp_path):
    occ = occurrences(seed=6)
    with pytest.raises(RuntimeError, match="reader broke"):
        with Ranking(2, 3, len(occ), True, tmp_dir=str(tmp_path), part_bytes=2000, spill_buffer=3000) as r:
            for b in blocks_of(occ, np.random.default_rng(7)):
                r.add(b)
            assert list(tmp_path.glob("rayattr-query-*/*.bin"))
            raise RuntimeError("reader broke")
    assert not list(tmp_path.iterdir())


# -- a store written by the store's own writer ------------------------------------------------

RANK, Q_BLOCKS, BATCH, SAMPLES, EPOCHS = 4, 2, 4, 48, 2


@pytest.fixture(scope="module")
def store_run(tmp_path_factory) -> tuple[Run, dict[str, torch.Tensor]]:
    """Final embeddings of 2 layers (r = 4) and their projection blocks, 48 samples x 2 epochs
    in steps of 4; samples 5 and 6 have the same embeddings, large along the query, in every
    epoch (a tie at the top), samples 7 and 8 the same against it (a tie at the bottom)."""
    root = str(tmp_path_factory.mktemp("stream-store"))
    layers = {"attn": RANK * RANK, "mlp": RANK * RANK}
    blocks = ProjectionBlocks(layers, RANK, RANK, Q_BLOCKS)
    run = Run.create(root, "stream", {"layers": blocks.dims, "status": "done", "projection": {"rank": RANK},
                                      "config": {"embed": {"error_blocks": Q_BLOCKS}}})
    gen = torch.Generator().manual_seed(0)
    query = {n: torch.randn(3, p, generator=gen, dtype=torch.float64) for n, p in layers.items()}
    emb = {n: torch.randn(SAMPLES, p, generator=gen) for n, p in layers.items()}
    for n in layers:
        emb[n][[5, 6]] = 3 * query[n][0].float()
        emb[n][[7, 8]] = -3 * query[n][0].float()
    sources = ["web" if i % 3 else "code" for i in range(SAMPLES)]
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(SAMPLES) for _ in range(EPOCHS)])
    with GradientWriter(run, 0, blocks.dims, kind=FINAL_KIND, steps_per_shard=5) as w:
        for step in range(len(order) // BATCH):
            rows = order[step * BATCH:(step + 1) * BATCH]
            w.write_step(step, (1000 + rows).tolist(), [sources[i] for i in rows],
                         blocks.augment({n: e[rows] for n, e in emb.items()}), positions=list(range(BATCH)))
    return Run.open(root, "stream"), query


@pytest.mark.parametrize("each", [True, False])
@pytest.mark.parametrize("sources", [None, ["web"]])
def test_query_ranking_of_a_store_equals_the_old_ranking(store_run, each, sources):
    run, query = store_run
    grads = query if each else {n: g.mean(0, keepdim=True) for n, g in query.items()}
    occ = score_occurrences(run, grads, block_rows=7)  # the same blocks: the same float64 scores
    assert len(occ) == SAMPLES * EPOCHS and occ.se is not None
    for k in (2, 5, 100):
        want = old_answers(occ, k, by_source=True, texts=texts_of, sources=sources)
        for part_bytes in (None, 400):
            got = rank_run(run, grads, k, by_source=True, sources=sources, texts_of=texts_of, block_rows=7,
                           part_bytes=part_bytes)
            assert got == want
        assert rank_run(run, grads, k, block_rows=7, part_bytes=400) == \
            old_answers(occ, k, by_source=False)


def test_the_store_case_has_ties_and_samples_across_blocks(store_run):
    """What the comparison above covers: the top two of each list are an exact tie (broken by
    the smaller sample id), every listed sample has one occurrence per epoch in different
    blocks of 7 rows, and ranking each block on its own would list other samples."""
    run, query = store_run
    grads = {n: g[:1] for n, g in query.items()}
    want = old_answers(score_occurrences(run, grads, block_rows=7), 10, by_source=False)[0]
    assert [r["sample_id"] for r in want["helpful"][:2]] == [1005, 1006]
    assert want["helpful"][0]["score"] == want["helpful"][1]["score"]
    assert [r["sample_id"] for r in want["harmful"][:2]] == [1007, 1008]
    assert want["harmful"][0]["score"] == want["harmful"][1]["score"]
    blocks = list(score_blocks(run, grads, block_rows=7))
    assert len(blocks) > 10 and all(len(b) == 8 for b in blocks)
    where = {}
    for i, b in enumerate(blocks):
        for sid in b.sample_ids.tolist():
            where.setdefault(sid, set()).add(i)
    assert all(r["n_occurrences"] == EPOCHS and len(where[r["sample_id"]]) == EPOCHS
               for key in ("helpful", "harmful") for r in want[key])
    per_block = sorted((r for b in blocks for r in old_rank_samples(b, b.scores[:, 0], 10)["helpful"]),
                       key=lambda r: (-r["score"], r["sample_id"]))[:10]
    assert [r["sample_id"] for r in per_block] != [r["sample_id"] for r in want["helpful"]]
    assert len(concat(blocks)) == SAMPLES * EPOCHS


def test_no_room_for_the_spilled_partitions_is_a_query_error(tmp_path):
    from rayattr.query import QueryError

    occ = occurrences(seed=10)
    with pytest.raises(QueryError, match=r"needs about .* GB of temporary files in .*missing.*set TMPDIR"):
        streamed(occ, 3, False, blocks_of(occ, np.random.default_rng(11)), tmp_path / "missing",
                 part_bytes=2000, spill_buffer=3000)
