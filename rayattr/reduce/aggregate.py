"""Dataset-level answers from the segments' outputs: the values/ and embeddings/ tables."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch

from rayattr.capture.projection import member_of
from rayattr.embed.blocks import ProjectionBlocks
from rayattr.embed.guard import check_values
from rayattr.store.layout import (ALL_SUMS, LAYER_VALUES, PHASE_VALUES, SAMPLE_VALUES, SOURCE_EMBEDDINGS, SOURCE_VALUES,
                                  segment_scores_path, segment_sums_path, segment_values_path)
from rayattr.embed.sums import SourcePhaseSums
from rayattr.store import Run


def segment_values(run: Run, n_segments: int):
    """Each segment's values table in turn (one in memory at a time), in training order:
    segments cover increasing step ranges, each sorted by (step, position)."""
    for i in range(n_segments):
        yield run.read_table(segment_values_path(i)).sort_by([("step", "ascending"), ("position", "ascending")])


# Resamples of the per-source bootstrap; above BOOTSTRAP_MAX_N occurrences the normal limit
# of the same bootstrap (√n · sd) is used instead of drawing n indices B times.
BOOTSTRAP_RESAMPLES, BOOTSTRAP_MAX_N = 1000, 20_000


def sum_interval(values: np.ndarray, rng: np.random.Generator, level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of Σ values over occurrences resampled with replacement: how much a
    source's value rests on which of its occurrences it happened to have."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    tail = (1 - level) / 2
    if n > BOOTSTRAP_MAX_N:
        from statistics import NormalDist

        z = NormalDist().inv_cdf(1 - tail)
        half = z * math.sqrt(n) * float(np.std(values))
        total = float(np.sum(values, dtype=np.float64))
        return total - half, total + half
    sums = values[rng.integers(0, n, (BOOTSTRAP_RESAMPLES, n))].sum(1, dtype=np.float64)
    return float(np.quantile(sums, tail)), float(np.quantile(sums, 1 - tail))


class SourceAccumulator:
    """Streaming per-source group-by of occurrence values, in float64: count, sum, and the
    mean/M2 of Chan et al.'s parallel update (for the normal-limit interval); the values
    themselves only while a source has at most BOOTSTRAP_MAX_N occurrences (the bootstrap
    needs them); distinct samples as a sorted id array per source."""

    def __init__(self):
        self.order: list[str] = []  # sources in order of first occurrence
        self.n: dict[str, int] = {}
        self.total: dict[str, float] = {}
        self.mean: dict[str, float] = {}
        self.m2: dict[str, float] = {}
        self.kept: dict[str, list[np.ndarray] | None] = {}
        self.ids: dict[str, np.ndarray] = {}

    def add(self, table: pa.Table) -> None:
        src = table["source"].to_numpy(zero_copy_only=False)
        val = table["value"].to_numpy().astype(np.float64)
        ids = table["sample_id"].to_numpy()
        names, first = np.unique(src, return_index=True)
        for name in names[np.argsort(first)]:
            mask = src == name
            v, s = val[mask], str(name)
            if s not in self.n:
                self.order.append(s)
                self.n[s], self.total[s], self.mean[s], self.m2[s] = 0, 0.0, 0.0, 0.0
                self.kept[s], self.ids[s] = [], np.zeros(0, np.int64)
            n_a, n_b = self.n[s], len(v)
            mean_b = float(v.mean())
            m2_b = float(((v - mean_b) ** 2).sum())
            delta = mean_b - self.mean[s]
            n = n_a + n_b
            self.mean[s] += delta * n_b / n
            self.m2[s] += m2_b + delta * delta * n_a * n_b / n
            self.n[s] = n
            self.total[s] += float(v.sum())
            if self.kept[s] is not None:
                self.kept[s] = self.kept[s] + [v] if n <= BOOTSTRAP_MAX_N else None
            self.ids[s] = np.union1d(self.ids[s], ids[mask])

    def table(self, seed: int = 0, level: float = 0.95, members: dict[str, list[float]] | None = None) -> pa.Table:
        """Per source: distinct samples, occurrences, summed value with its 95 % bootstrap
        interval (value_low, value_high) and value per sample; best value per sample first.
        `members` (capture.members): each source's total by member; their spread is the
        estimate's standard error of the total (value_se), and the interval widens by its
        Student-t half-width (k − 1 degrees of freedom), added in quadrature to each side of
        the bootstrap's: which occurrences a source had, and how well one run estimates them."""
        rng = np.random.default_rng(seed)
        rows = []
        for s in self.order:
            n, total = self.n[s], self.total[s]
            if self.kept[s] is not None:
                low, high = sum_interval(np.concatenate(self.kept[s]), rng, level)
            else:  # the bootstrap's normal limit, √n · sd (population sd, as np.std)
                from statistics import NormalDist

                half = NormalDist().inv_cdf(1 - (1 - level) / 2) * math.sqrt(n) * math.sqrt(self.m2[s] / n)
                low, high = total - half, total + half
            se = None
            if members is not None and len(members.get(s, ())) > 1:
                from scipy.stats import t as student  # only here: scipy.stats costs the driver ~60 MB

                est = np.asarray(members[s], dtype=np.float64)
                se = float(est.std(ddof=1) / math.sqrt(len(est)))
                half = float(student.ppf(1 - (1 - level) / 2, len(est) - 1)) * se
                low, high = total - math.hypot(total - low, half), total + math.hypot(high - total, half)
            k = len(self.ids[s])
            rows.append({"source": s, "n_samples": k, "n_occurrences": n, "value": total,
                         "value_low": low, "value_high": high, "value_per_sample": total / k, "value_se": se})
        schema = pa.schema([("source", pa.string()), ("n_samples", pa.int64()), ("n_occurrences", pa.int64()),
                            ("value", pa.float64()), ("value_low", pa.float64()), ("value_high", pa.float64()),
                            ("value_per_sample", pa.float64()), ("value_se", pa.float64())])
        return pa.Table.from_pylist(rows, schema=schema).sort_by([("value_per_sample", "descending")])


def source_values(samples: pa.Table, seed: int = 0) -> pa.Table:
    """Per source: distinct samples, occurrences, summed value with its 95 % bootstrap interval
    (value_low, value_high) and value per sample, from a table of occurrences."""
    acc = SourceAccumulator()
    acc.add(samples)
    return acc.table(seed)


def merged_sums(run: Run, n_segments: int, dims: dict[str, int]) -> SourcePhaseSums:
    total = SourcePhaseSums(dims)
    for i in range(n_segments):
        total.merge(SourcePhaseSums.from_table(run.read_table(segment_sums_path(i, final=True)), dims))
    return total


def member_totals(by_layer: dict[tuple[str, str], float], members: int) -> dict[str, list[float]] | None:
    """Each source's total by member of the projection (capture.members), from merged_scores'
    per-(source, layer) sums, which count each member 1/members; None for one member."""
    if members < 2:
        return None
    out: dict[str, list[float]] = {}
    for (src, layer), v in by_layer.items():
        out.setdefault(src, [0.0] * members)[member_of(layer)[1]] += v * members
    return out


def merged_scores(run: Run, n_segments: int) -> tuple[dict, dict, dict]:
    """The segments' per-(source, phase, layer) value sums (the vector chain's, float64) grouped
    by (source, phase) and by (source, layer), with occurrence counts per (source, phase)."""
    by_phase: dict[tuple[str, int], float] = {}
    by_layer: dict[tuple[str, str], float] = {}
    count: dict[tuple[str, int], int] = {}
    for i in range(n_segments):
        t = run.read_table(segment_scores_path(i)).to_pydict()
        seen = set()
        for src, ph, layer, n, v in zip(t["source"], t["phase"], t["layer"], t["n_occurrences"], t["value"]):
            by_phase[(src, ph)] = by_phase.get((src, ph), 0.0) + v
            by_layer[(src, layer)] = by_layer.get((src, layer), 0.0) + v
            if (src, ph) not in seen:  # one count per (source, phase) of a segment, not per layer
                seen.add((src, ph))
                count[(src, ph)] = count.get((src, ph), 0) + n
    return by_phase, by_layer, count


def phase_values(by_phase: dict, count: dict, edges: list[int]) -> pa.Table:
    """Per source x phase, from the summed embeddings (no per-sample data needed)."""
    keys = sorted(by_phase)
    return pa.table({
        "source": pa.array([k[0] for k in keys], pa.string()),
        "phase": pa.array([k[1] for k in keys], pa.int64()),
        "step_start": pa.array([edges[k[1]] for k in keys], pa.int64()),
        "step_end": pa.array([edges[k[1] + 1] for k in keys], pa.int64()),
        "n_occurrences": pa.array([count[k] for k in keys], pa.int64()),
        "value": pa.array([by_phase[k] for k in keys], pa.float64()),
    })


def layer_values(by_layer: dict, layers: list[str]) -> pa.Table:
    """Per source x layer: the part of the source's value carried by each layer's block of the
    curvature (layers are independent in the recursion, so the parts add up to the value; with
    embed.joint_layers the recursion has one layer, `joint`, and the table one row a source)."""
    sources = sorted({k[0] for k in by_layer})
    rows = [{"source": s, "layer": n, "value": by_layer[(s, n)]} for s in sources for n in layers
            if (s, n) in by_layer]
    return pa.Table.from_pylist(rows, schema=pa.schema([("source", pa.string()), ("layer", pa.string()),
                                                        ("value", pa.float64())]))


def source_embeddings(sums: SourcePhaseSums) -> pa.Table:
    """Final per-source embeddings (sum over occurrences), to value new test sets later."""
    by_src = sums.by_source()
    names = sorted(by_src)
    cols = {"source": pa.array(names, pa.string())}
    for n, p in sums.dims.items():
        flat = np.concatenate([by_src[s][n].double().numpy() for s in names]) if names else np.zeros(0)
        cols[n] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float64()), p)
    return pa.table(cols)


SAMPLE_COLUMNS = ["sample_id", "source", "step", "epoch", "value", "value_se"]


def write_outputs(run: Run, n_segments: int, edges: list[int]) -> dict:
    """values/ and embeddings/ from the segments' tables, one segment in memory at a time:
    a first pass checks every value and groups by source (float64), a second streams the
    occurrences into values/samples.parquet, so nothing is written when a value is bad."""
    layout = ProjectionBlocks.for_run(run.manifest, 1)
    dims = layout.layers  # the recursion's layers (embed.joint_layers: one a member)
    acc = SourceAccumulator()
    for table in segment_values(run, n_segments):
        check_values(torch.from_numpy(table["value"].to_numpy().copy()), table["step"].to_numpy().copy(), SAMPLE_VALUES)
        acc.add(table)
    by_phase, by_layer, count = merged_scores(run, n_segments)
    sources = acc.table(members=member_totals(by_layer, layout.members))
    with run.table_writer(SAMPLE_VALUES) as w:
        for table in segment_values(run, n_segments):
            w.write(table.select(SAMPLE_COLUMNS))
    run.write_table(SOURCE_VALUES, sources)
    run.write_table(PHASE_VALUES, phase_values(by_phase, count, edges))
    run.write_table(LAYER_VALUES, layer_values(by_layer, list(dims)))
    if run.exists(ALL_SUMS):  # the forward scan's (no suffix matrices were formed)
        sums = SourcePhaseSums.from_table(run.read_table(ALL_SUMS), dims)
        run.write_table(SOURCE_EMBEDDINGS, source_embeddings(sums))
    elif all(run.exists(segment_sums_path(i, final=True)) for i in range(n_segments)):
        run.write_table(SOURCE_EMBEDDINGS, source_embeddings(merged_sums(run, n_segments, dims)))
    return {"sources": sources.to_pylist(), "occurrences": sum(acc.n.values())}
