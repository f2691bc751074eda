"""Dataset-level answers from the segments' outputs: the values/ and embeddings/ tables."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from rayattr.embed.guard import check_values
from rayattr.embed.segment import sums_path, values_path
from rayattr.embed.sums import SourcePhaseSums
from rayattr.store import Run


def phase_edges(num_steps: int, phases: int) -> list[int]:
    """Step boundaries of `phases` equal buckets (fewer when there are fewer steps)."""
    phases = max(1, min(phases, num_steps))
    return [round(i * num_steps / phases) for i in range(phases + 1)]


def sample_values(run: Run, n_segments: int) -> pa.Table:
    """One row per occurrence, in training order."""
    table = pa.concat_tables([run.read_table(values_path(i)) for i in range(n_segments)])
    return table.sort_by([("step", "ascending"), ("position", "ascending")])


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


def source_values(samples: pa.Table, seed: int = 0) -> pa.Table:
    """Per source: distinct samples, occurrences, summed value with its 95 % bootstrap interval
    (value_low, value_high) and value per sample."""
    g = samples.group_by("source").aggregate([("sample_id", "count_distinct"), ("sample_id", "count"),
                                              ("value", "sum")])
    names = {"sample_id_count_distinct": "n_samples", "sample_id_count": "n_occurrences", "value_sum": "value"}
    g = g.rename_columns([names.get(c, c) for c in g.column_names])
    g = g.append_column("value_per_sample", pc.divide(g["value"], pc.cast(g["n_samples"], pa.float64())))
    rng = np.random.default_rng(seed)
    src, val = samples["source"].to_numpy(zero_copy_only=False), samples["value"].to_numpy()
    bounds = [sum_interval(val[src == s], rng) for s in g["source"].to_pylist()]
    g = g.append_column("value_low", pa.array([b[0] for b in bounds], pa.float64()))
    g = g.append_column("value_high", pa.array([b[1] for b in bounds], pa.float64()))
    g = g.select(["source", "n_samples", "n_occurrences", "value", "value_low", "value_high", "value_per_sample"])
    return g.sort_by([("value_per_sample", "descending")])


def merged_sums(run: Run, n_segments: int, dims: dict[str, int]) -> SourcePhaseSums:
    total = SourcePhaseSums(dims)
    for i in range(n_segments):
        total.merge(SourcePhaseSums.from_table(run.read_table(sums_path(i, final=True)), dims))
    return total


def phase_values(sums: SourcePhaseSums, edges: list[int], test_grad: dict[str, torch.Tensor]) -> pa.Table:
    """Per source x phase, straight from the summed embeddings (no per-sample data needed)."""
    vals = sums.values(test_grad)
    keys = sorted(vals)
    return pa.table({
        "source": pa.array([k[0] for k in keys], pa.string()),
        "phase": pa.array([k[1] for k in keys], pa.int64()),
        "step_start": pa.array([edges[k[1]] for k in keys], pa.int64()),
        "step_end": pa.array([edges[k[1] + 1] for k in keys], pa.int64()),
        "n_occurrences": pa.array([sums.count[k] for k in keys], pa.int64()),
        "value": pa.array([vals[k] for k in keys], pa.float64()),
    })


def layer_values(sums: SourcePhaseSums, test_grad: dict[str, torch.Tensor]) -> pa.Table:
    """Per source x layer: the part of the source's value carried by each layer's block of the
    curvature (layers are independent in the recursion, so the parts add up to the value)."""
    by_src = sums.by_source()
    rows = [{"source": s, "layer": n, "value": float(by_src[s][n] @ test_grad[n].to(by_src[s][n].dtype))}
            for s in sorted(by_src) for n in sums.dims]
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


def write_outputs(run: Run, n_segments: int, edges: list[int], test_grad: dict[str, torch.Tensor]) -> dict:
    dims = {k: int(v) for k, v in run.manifest["layer_dims"].items()}
    samples = sample_values(run, n_segments)
    check_values(torch.from_numpy(samples["value"].to_numpy()), samples["step"].to_numpy(), "values/samples.parquet")
    sources = source_values(samples)
    sums = merged_sums(run, n_segments, dims)
    run.write_table("values/samples.parquet",
                    samples.select(["sample_id", "source", "step", "epoch", "value", "value_se"]))
    run.write_table("values/sources.parquet", sources)
    run.write_table("values/phases.parquet", phase_values(sums, edges, test_grad))
    run.write_table("values/layers.parquet", layer_values(sums, test_grad))
    run.write_table("embeddings/sources.parquet", source_embeddings(sums))
    return {"sources": sources.to_pylist(), "occurrences": samples.num_rows}
