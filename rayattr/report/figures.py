"""The report's figures, each a PNG (bytes) drawn from the run's value tables.

matplotlib runs headless (Agg); every function takes plain pyarrow tables, so the figures
can be redrawn from the Parquet outputs alone.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

HELPFUL, HARMFUL = "#2b8a3e", "#c92a2a"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def source_bars(sources: pa.Table) -> bytes:
    """Value per sample of each source (values/sources.parquet), best at the top."""
    rows = sorted(sources.to_pylist(), key=lambda r: r["value_per_sample"])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    vals = [r["value_per_sample"] for r in rows]
    ax.barh([r["source"] for r in rows], vals, color=[HELPFUL if v >= 0 else HARMFUL for v in vals])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("value per sample (predicted increase of validation loss if removed)")
    ax.set_title("Data sources")
    return _png(fig)


def step_buckets(samples: pa.Table, num_steps: int, buckets: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Bucket start steps and the mean value of the occurrences in each bucket."""
    steps = samples["step"].to_numpy()
    values = samples["value"].to_numpy()
    buckets = max(1, min(buckets, num_steps))
    edges = np.linspace(0, num_steps, buckets + 1)
    which = np.clip(np.searchsorted(edges, steps, side="right") - 1, 0, buckets - 1)
    total = np.bincount(which, weights=values, minlength=buckets)
    count = np.bincount(which, minlength=buckets)
    return edges[:-1], np.divide(total, count, out=np.zeros(buckets), where=count > 0)


def influence_over_steps(samples: pa.Table, num_steps: int, buckets: int = 20) -> bytes:
    """Mean value of an occurrence against its training step: the paper's warm-up, basin and
    late-ascent phases show as where in training single samples matter most."""
    starts, means = step_buckets(samples, num_steps, buckets)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = (starts[1] - starts[0]) if len(starts) > 1 else 1
    ax.bar(starts, means, width=width * 0.9, align="edge", color=[HELPFUL if m >= 0 else HARMFUL for m in means])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("mean value per occurrence")
    ax.set_title("Influence against training step")
    return _png(fig)


def phase_heatmap(phases: pa.Table) -> bytes:
    """Source x phase value (values/phases.parquet), diverging around zero."""
    sources = sorted(set(phases["source"].to_pylist()))
    ids = sorted(set(phases["phase"].to_pylist()))
    grid = np.zeros((len(sources), len(ids)))
    labels = {}
    for r in phases.to_pylist():
        grid[sources.index(r["source"]), ids.index(r["phase"])] = r["value"]
        labels[r["phase"]] = f"{r['step_start']}–{r['step_end']}"
    lim = float(np.abs(grid).max()) or 1.0
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(sources) + 1.6))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_yticks(range(len(sources)), sources)
    ax.set_xticks(range(len(ids)), [labels[i] for i in ids], rotation=45, ha="right")
    ax.set_xlabel("training steps (phase)")
    ax.set_title("Value by source and phase")
    fig.colorbar(im, ax=ax, label="summed value")
    return _png(fig)
