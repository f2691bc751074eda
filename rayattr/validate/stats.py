"""Agreement between predicted and retrained loss changes (docs/method.md, "Validation")."""

from __future__ import annotations

import math

import numpy as np


def spearman(predicted, actual) -> float | None:
    """Spearman rank correlation; None when there are fewer than 3 pairs or no spread."""
    from scipy.stats import spearmanr  # scipy loads slowly; only validation needs it

    p, a = np.asarray(predicted, float), np.asarray(actual, float)
    if len(p) < 3 or np.ptp(p) == 0 or np.ptp(a) == 0:
        return None
    rho = float(spearmanr(p, a).statistic)
    return rho if math.isfinite(rho) else None


def bootstrap_spearman_ci(predicted, actual, rng: np.random.Generator, n_boot: int = 2000,
                          level: float = 0.95) -> list[float] | None:
    """Percentile interval of the Spearman correlation over pairs resampled with replacement."""
    p, a = np.asarray(predicted, float), np.asarray(actual, float)
    if spearman(p, a) is None:
        return None
    stats = []
    for _ in range(n_boot):
        i = rng.integers(0, len(p), len(p))
        rho = spearman(p[i], a[i])
        if rho is not None:
            stats.append(rho)
    if not stats:
        return None
    tail = (1 - level) / 2
    return [float(np.quantile(stats, tail)), float(np.quantile(stats, 1 - tail))]


def slope(predicted, actual) -> float | None:
    """Least-squares magnitude: the c minimising Σ (actual − c·predicted)². 1 means the values
    have the right size; 0.5 means the loss changes by half of what they predict."""
    p, a = np.asarray(predicted, float), np.asarray(actual, float)
    denom = float(p @ p)
    return float(p @ a) / denom if len(p) and denom > 0 else None
