"""The report streams values/samples.parquet (rayattr/report/html.py): the per-sample totals
(O(distinct samples)), the step buckets and the noise figures equal the in-memory ones over
the whole table, with batches far smaller than the table and medians selected in passes."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayattr.report import html as report_html
from rayattr.report.figures import step_buckets
from rayattr.report.html import (OccurrenceStats, SampleTotals, _radix_select, noise_figures, sample_totals,
                                 scan_samples)
from rayattr.store.layout import SAMPLE_VALUES
from tests.test_store import new_run


def occurrences(n: int, distinct: int, seed: int = 0, se: str = "some") -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, distinct, n)
    value_se = rng.exponential(1e-3, n)
    cols = {"sample_id": ids, "source": [f"src{i % 4}" for i in ids], "step": rng.integers(0, 40, n),
            "epoch": rng.integers(0, 3, n), "value": rng.normal(0, 1e-3, n)}
    if se == "some":
        cols["value_se"] = pa.array(np.where(rng.random(n) < 0.05, 0.0, value_se), mask=rng.random(n) < 0.1)
    else:  # "null": embed.error_blocks = 1 estimates no SE
        cols["value_se"] = pa.nulls(n, pa.float64())
    return pa.table(cols)


def stored(store_root, table: pa.Table, group_rows: int):
    run = new_run(store_root)
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=group_rows)
    run.write_bytes(SAMPLE_VALUES, sink.getvalue())
    return run


@pytest.mark.parametrize("se", ["some", "null"])
def test_streamed_totals_and_figures_equal_the_in_memory_ones(store_root, monkeypatch, se):
    table = occurrences(3001, 700, se=se)
    run = stored(store_root, table, group_rows=450)
    monkeypatch.setattr(report_html, "SCAN_ROWS", 128)  # 24 batches, partial groups merged often
    monkeypatch.setattr(report_html, "MEDIAN_CAP", 5)  # the median takes several passes
    stats, sums = OccurrenceStats(40), SampleTotals()
    batches = list(scan_samples(run))
    assert max(b.num_rows for b in batches) <= 128 and sum(b.num_rows for b in batches) == table.num_rows
    for b in batches:
        stats.add(b)
        sums.add(b)
    assert sums.merged is None or sums.merged.num_rows <= 700  # O(distinct samples)
    want = sample_totals(table)
    got = sums.table()
    assert got.num_rows == len(want) == len(set(table["sample_id"].to_pylist()))
    for k in (1, 10, 700):
        top, bottom = sums.extremes(k)
        for g, w in zip(top + bottom, want[:k] + want[::-1][:k]):
            assert (g["sample_id"], g["source"], g["n_occurrences"], g["noise"]) == \
                   (w["sample_id"], w["source"], w["n_occurrences"], w["noise"])
            assert g["value"] == pytest.approx(w["value"], rel=1e-12, abs=1e-18)
            assert (g["se"] is None) == (w["se"] is None)
            assert g["se"] is None or g["se"] == pytest.approx(w["se"], rel=1e-12)
    assert stats.rows == table.num_rows
    s_got, m_got = stats.step_means()
    s_want, m_want = step_buckets(table, 40)
    assert np.array_equal(s_got, s_want) and np.allclose(m_got, m_want, rtol=1e-12, atol=0)
    noise = noise_figures(run, stats)
    if se != "some":
        assert noise is None
        return
    v, e = table["value"].to_numpy(), table["value_se"].to_numpy()
    ok = e > 0
    ratio = abs(v[ok]) / e[ok]
    assert noise == (float(np.median(ratio)), float(np.mean(ratio < 2)))  # exactly


@pytest.mark.parametrize("cap", [0, 3, 1 << 20])
def test_radix_select_is_exact(monkeypatch, cap):
    monkeypatch.setattr(report_html, "MEDIAN_CAP", cap)
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.exponential(2.0, 500), np.zeros(7), np.full(9, 1.5), rng.random(40) * 1e-300,
                             [np.finfo(float).max, 5e-324]])
    parts = np.array_split(rng.permutation(values), 13)
    want = np.sort(values)
    for k in (0, 1, 6, 7, 100, 277, 278, len(values) - 2, len(values) - 1):
        assert _radix_select(lambda: iter(parts), k) == want[k]
