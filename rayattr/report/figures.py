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

# Okabe-Ito blue and vermillion: told apart with every common colour-vision deficiency
# (the former green/red pair was not); the heat map uses the matching diverging RdBu.
HELPFUL, HARMFUL = "#0072b2", "#d55e00"


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
    err = None
    if "value_low" in sources.column_names:  # 95 % bootstrap interval over the source's occurrences
        err = np.array([[r["value_per_sample"] - r["value_low"] / r["n_samples"] for r in rows],
                        [r["value_high"] / r["n_samples"] - r["value_per_sample"] for r in rows]])
    ax.barh([r["source"] for r in rows], vals, xerr=err, capsize=3,
            color=[HELPFUL if v >= 0 else HARMFUL for v in vals])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("value per sample (predicted increase of validation loss if removed)")
    ax.set_title("Data sources" + (" (bars: 95 % bootstrap interval)" if err is not None else ""))
    return _png(fig)


def predicted_vs_actual(table: pa.Table, label: str | None, title: str) -> bytes:
    """Validation: predicted Σ value against the retrained change of the validation loss, one
    point per counterfactual, with the line actual = predicted."""
    p, a = table["predicted"].to_numpy(), table["actual"].to_numpy()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.scatter(p, a, color=HELPFUL, s=22)
    if label is not None:
        for x, y, name in zip(p, a, table[label].to_pylist()):
            ax.annotate(str(name), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    lo, hi = float(min(p.min(), a.min())), float(max(p.max(), a.max()))
    ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, linestyle="--")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set_xlabel("predicted (Σ value of the removed occurrences)")
    ax.set_ylabel("actual (retrained Δ validation loss)")
    ax.set_title(title, fontsize=10)
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
    return step_bars(*step_buckets(samples, num_steps, buckets))


def step_bars(starts: np.ndarray, means: np.ndarray) -> bytes:
    """influence_over_steps from its buckets (step_buckets, or the report's streaming pass)."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = (starts[1] - starts[0]) if len(starts) > 1 else 1
    ax.bar(starts, means, width=width * 0.9, align="edge", color=[HELPFUL if m >= 0 else HARMFUL for m in means])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("mean value per occurrence")
    ax.set_title("Influence against training step")
    return _png(fig)


def phase_means(phases: pa.Table) -> tuple[list[str], list[str], np.ndarray]:
    """Sources (rows, highest value per occurrence first), phase labels and the mean value of
    one occurrence in each (source, phase): sums would mostly show how often a source came up."""
    rows = phases.to_pylist()
    ids = sorted({r["phase"] for r in rows})
    labels = {r["phase"]: f"{r['step_start']}–{r['step_end']}" for r in rows}
    total: dict[str, list[float]] = {}
    for r in rows:
        t = total.setdefault(r["source"], [0.0, 0.0])
        t[0] += r["value"]
        t[1] += r["n_occurrences"]
    sources = sorted(total, key=lambda s: -total[s][0] / max(1.0, total[s][1]))
    grid = np.full((len(sources), len(ids)), np.nan)
    for r in rows:
        if r["n_occurrences"]:
            grid[sources.index(r["source"]), ids.index(r["phase"])] = r["value"] / r["n_occurrences"]
    return sources, [labels[i] for i in ids], grid


def phase_heatmap(phases: pa.Table) -> bytes:
    """Mean value per occurrence by source x phase (values/phases.parquet), diverging around zero."""
    sources, labels, grid = phase_means(phases)
    lim = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(sources) + 1.6))
    im = ax.imshow(grid, cmap="RdBu", vmin=-(lim or 1.0), vmax=lim or 1.0, aspect="auto")
    ax.set_yticks(range(len(sources)), sources)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_xlabel("training steps (phase)")
    ax.set_title("Value per occurrence by source and phase (best source on top)")
    fig.colorbar(im, ax=ax, label="mean value per occurrence")
    return _png(fig)


def loss_curve(steps: list[int], losses: list[float]) -> bytes:
    """The training loss recorded per step (global-batch mean)."""
    fig, ax = plt.subplots(figsize=(7, 2.8))
    ax.plot(steps, losses, color=HELPFUL, linewidth=1.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    return _png(fig)
