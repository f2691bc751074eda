"""The streaming reducer (one segment's tables in memory at a time, float64) against the
whole-table group-by it replaced, computed here by brute force over all segments at once."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from rayattr.embed.segment import SCORES_SCHEMA
from rayattr.store.layout import segment_scores_path, segment_values_path
from rayattr.reduce import aggregate
from rayattr.reduce.aggregate import SourceAccumulator, sum_interval, write_outputs
from rayattr.store import Run

DIMS = {"a": 2, "b": 3}


def segment_tables(rng, n_seg=3, steps=6, batch=5, sources=("x", "y", "z")):
    tables, step = [], 0
    for _ in range(n_seg):
        rows = {k: [] for k in ("sample_id", "source", "step", "epoch", "position", "value", "value_se")}
        for _ in range(steps):
            for pos in range(batch):
                rows["sample_id"].append(int(rng.integers(0, 40)))
                rows["source"].append(str(rng.choice(sources)))
                rows["step"].append(step)
                rows["epoch"].append(step // 9)
                rows["position"].append(pos)
                rows["value"].append(float(rng.normal()) * 10.0 ** int(rng.integers(-6, 6)))
                rows["value_se"].append(float(rng.random()))
            step += 1
        tables.append(pa.table(rows).sort_by([("position", "descending")]))  # the reducer sorts
    return tables


def brute_sources(tables, seed=0):
    """Whole-table reference: concatenate, sort in training order, group by source."""
    t = pa.concat_tables(tables).sort_by([("step", "ascending"), ("position", "ascending")])
    src, val, ids = (t["source"].to_numpy(zero_copy_only=False), t["value"].to_numpy(), t["sample_id"].to_numpy())
    order = list(dict.fromkeys(src.tolist()))
    rng = np.random.default_rng(seed)
    out = {}
    for s in order:
        v = val[src == s]
        low, high = sum_interval(v, rng)
        out[s] = {"n_samples": len(set(ids[src == s].tolist())), "n_occurrences": len(v),
                  "value": math.fsum(v.tolist()), "value_low": low, "value_high": high}
    return t, out


def make_run(tmp_path, tables, rng):
    run = Run.create(str(tmp_path), "r", {"layer_dims": DIMS})
    for i, t in enumerate(tables):
        run.write_table(segment_values_path(i), t)
        rows = [{"source": s, "phase": ph, "layer": n, "n_occurrences": int(rng.integers(1, 9)),
                 "value": float(rng.normal())} for s in ("x", "y") for ph in (0, 1) for n in DIMS]
        run.write_table(segment_scores_path(i), pa.Table.from_pylist(rows, schema=SCORES_SCHEMA))
    return run


def test_streamed_outputs_equal_the_whole_table_reference(tmp_path):
    rng = np.random.default_rng(0)
    tables = segment_tables(rng)
    run = make_run(tmp_path, tables, rng)
    write_outputs(run, len(tables), [0, 9, 18])

    whole, want = brute_sources(tables)
    samples = run.read_table("values/samples.parquet")
    assert samples.column_names == ["sample_id", "source", "step", "epoch", "value", "value_se"]
    assert samples.equals(whole.select(samples.column_names))  # training order, every occurrence
    got = {r["source"]: r for r in run.read_table("values/sources.parquet").to_pylist()}
    assert set(got) == set(want)
    for s, w in want.items():
        assert got[s]["n_samples"] == w["n_samples"] and got[s]["n_occurrences"] == w["n_occurrences"]
        assert got[s]["value"] == pytest.approx(w["value"], rel=1e-12, abs=1e-9)
        assert got[s]["value_low"] == pytest.approx(w["value_low"], rel=1e-12)
        assert got[s]["value_high"] == pytest.approx(w["value_high"], rel=1e-12)
        assert got[s]["value_per_sample"] == pytest.approx(w["value"] / w["n_samples"], rel=1e-12)

    scores = pa.concat_tables([run.read_table(segment_scores_path(i)) for i in range(len(tables))]).to_pylist()
    phases = {(r["source"], r["phase"]): r for r in run.read_table("values/phases.parquet").to_pylist()}
    for key, row in phases.items():
        mine = [r for r in scores if (r["source"], r["phase"]) == key]
        assert row["value"] == pytest.approx(math.fsum(r["value"] for r in mine), rel=1e-12)
        assert row["n_occurrences"] == sum(r["n_occurrences"] for r in mine if r["layer"] == "a")
        assert (row["step_start"], row["step_end"]) == ([0, 9][key[1]], [9, 18][key[1]])
    layers = run.read_table("values/layers.parquet").to_pylist()
    assert len(layers) == 2 * len(DIMS)
    for row in layers:
        want_l = math.fsum(r["value"] for r in scores if (r["source"], r["layer"]) == (row["source"], row["layer"]))
        assert row["value"] == pytest.approx(want_l, rel=1e-12)


def test_large_sources_use_the_normal_limit_from_merged_moments(monkeypatch):
    """Above BOOTSTRAP_MAX_N the per-source values are dropped; the interval comes from the
    mean and M2 merged chunk by chunk, equal to the one-pass numpy figures."""
    monkeypatch.setattr(aggregate, "BOOTSTRAP_MAX_N", 50)
    rng = np.random.default_rng(1)
    vals = rng.normal(3.0, 2.0, 400) + 1e6  # a large offset: a naive Σx² would cancel
    acc = SourceAccumulator()
    for chunk in np.array_split(vals, 7):
        acc.add(pa.table({"source": ["s"] * len(chunk), "value": chunk, "sample_id": np.arange(len(chunk))}))
    assert acc.kept["s"] is None
    row = acc.table().to_pylist()[0]
    half = 1.959963984540054 * math.sqrt(400) * float(np.std(vals))
    total = math.fsum(vals.tolist())
    assert row["value"] == pytest.approx(total, rel=1e-13)
    assert row["value_high"] - row["value"] == pytest.approx(half, rel=1e-9)
    assert row["n_samples"] == max(len(c) for c in np.array_split(vals, 7))  # ids repeat across chunks


def test_members_widen_a_sources_interval_by_their_t_half_width():
    """capture.members: a source's value_se is the spread of its members' totals over √k, and
    each side of its bootstrap interval grows in quadrature by the Student-t half-width (k − 1
    degrees of freedom); member totals come from the per-layer sums, which count a member 1/k."""
    from scipy.stats import t as student

    rng = np.random.default_rng(3)
    vals = rng.normal(0.5, 1.0, 60)
    acc = SourceAccumulator()
    acc.add(pa.table({"source": ["s"] * 60, "value": vals, "sample_id": np.arange(60)}))
    plain = acc.table().to_pylist()[0]
    assert plain["value_se"] is None
    by_layer = {("s", "a"): 1.0, ("s", "b"): 2.0, ("s", "a~1"): 4.0, ("s", "b~1"): 0.5, ("s", "a~2"): 0.0,
                ("s", "b~2"): 1.5}
    totals = aggregate.member_totals(by_layer, 3)
    assert totals == {"s": [9.0, 13.5, 4.5]} and aggregate.member_totals(by_layer, 1) is None
    row = acc.table(members=totals).to_pylist()[0]
    se = float(np.std([9.0, 13.5, 4.5], ddof=1) / math.sqrt(3))
    half = student.ppf(0.975, 2) * se
    assert row["value_se"] == pytest.approx(se, rel=1e-12)
    assert row["value"] == plain["value"]
    assert row["value_high"] - row["value"] == pytest.approx(math.hypot(plain["value_high"] - plain["value"], half))
    assert row["value"] - row["value_low"] == pytest.approx(math.hypot(plain["value"] - plain["value_low"], half))


def test_sums_stay_float64_where_float32_would_drop_the_small_values():
    vals = np.array([1e8] + [1.0] * 1000 + [-1e8])
    acc = SourceAccumulator()
    for chunk in np.array_split(vals, 5):
        acc.add(pa.table({"source": ["s"] * len(chunk), "value": chunk, "sample_id": np.arange(len(chunk))}))
    assert acc.total["s"] == 1000.0
    assert float(np.sum(vals.astype(np.float32), dtype=np.float32)) != 1000.0  # what float32 would give


def test_a_failed_stream_leaves_no_object(tmp_path):
    run = Run.create(str(tmp_path), "r", {})
    with pytest.raises(RuntimeError, match="boom"):
        with run.table_writer("values/x.parquet") as w:
            w.write(pa.table({"a": [1, 2]}))
            raise RuntimeError("boom")
    assert not run.exists("values/x.parquet")
    with run.table_writer("values/x.parquet") as w:
        for k in range(3):
            w.write(pa.table({"a": [k, k]}))
    assert run.read_table("values/x.parquet")["a"].to_pylist() == [0, 0, 1, 1, 2, 2]
