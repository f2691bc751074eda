"""The attributability check: does the run's final loss respond linearly to its data?

Independently of the values, retrain the run with every occurrence's loss weight set to
1 + h·w_i and 1 + 2h·w_i, w one Rademacher (±1) direction over the occurrences, for two (or
more) step sizes h. With f(t) the final validation loss at weights 1 + t·w and f(0) the run
itself (the nothing-removed retrain reproduces it):

- the slope d(h) = (f(h) − f(0)) / h, the directional derivative measured at scale h;
- the curvature ratio ν(h) = |f(2h) − 2 f(h) + f(0)| / |f(2h) − f(0)|: how far the linear
  extrapolation from h to 2h misses, relative to the response (0 when f is linear over [0, 2h],
  O(1) when the trajectory turns a small change of the data into an unrelated end point);
- the slope agreement a = 1 − |d(h₁) − d(h₂)| / max(|d(h₁)|, |d(h₂)|), clipped to [0, 1], over
  every pair of step sizes: a smooth response has one slope at every small scale, a chaotic
  one's "slope" grows like 1/h.

smoothness = min(1 − min(1, max_h ν(h)), min a): the worst of the two checks, so either one
failing fails the run. attributable = smoothness ≥ THRESHOLD. docs/method.md §6
("Attributability") says why these numbers.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from rayattr.validate.counterfactuals import Removal
from rayattr.validate.errors import ValidationError

DEFAULT_STEPS = (0.1, 0.01)
"""h = 0.1 with ±1 entries moves the loss weights by as much (L2) as removing 1 % of the
occurrences, the removal size of an LDS; h = 0.01 is ten times further inside the linear regime."""

THRESHOLD = 0.7
"""attributable when smoothness >= 0.7: the response is linear to within 30 % at each scale
and the two scales' slopes agree to within 30 %, the tolerance of the verdict's size bar
(values within 0.7–1.4× the first-order response, validation.TRACKS_RATIO)."""

TINY = 1e-30


def check_steps(steps) -> tuple[float, ...]:
    """The step sizes h, sorted largest first, or a ValidationError naming the bad one: each
    must lie in (0, 0.5] (the weights 1 − 2h stay >= 0), and at least two distinct ones."""
    out = []
    for h in steps:
        try:
            h = float(h)
        except (TypeError, ValueError):
            raise ValidationError(f"--smoothness-steps: {h!r} is not a number") from None
        if not (math.isfinite(h) and 0 < h <= 0.5):
            raise ValidationError(f"--smoothness-steps: h = {h:g} is out of range; each h must lie in (0, 0.5] "
                                  "so that the loss weights 1 ± 2h stay >= 0")
        out.append(h)
    out = sorted(set(out), reverse=True)
    if len(out) < 2:
        raise ValidationError(f"--smoothness-steps: need at least two distinct step sizes (got {out}); "
                              "the slopes' agreement across scales is half of the check")
    return tuple(out)


def parse_steps(text: str) -> tuple[float, ...]:
    """"H1,H2[,…]" from the command line (see `check_steps`)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    return check_steps(parts)


def direction_retrains(seed: int, steps, window: tuple[int, int] | None = None) -> list[Removal]:
    """The retrains of the check: weights 1 + h·w and 1 + 2h·w for each h (a scale two step
    sizes share is retrained once)."""
    scales = dict.fromkeys(round(s, 12) for h in check_steps(steps) for s in (h, 2 * h))
    return [Removal("direction", f"{s:g}", direction=int(seed), scale=s, window=window) for s in scales]


def along(retrains: list[Removal], scale: float) -> Removal:
    return next(r for r in retrains if r.scale == round(scale, 12))


def smoothness_of(f0: float, losses: dict[float, tuple[float, float]],
                  threshold: float = THRESHOLD) -> dict[str, Any]:
    """Score and verdict from f(0) and {h: (f(h), f(2h))}."""
    per_step, slopes = [], {}
    for h in sorted(losses, reverse=True):
        fh, f2h = losses[h]
        nu = abs(f2h - 2 * fh + f0) / (abs(f2h - f0) + TINY)
        slopes[h] = (fh - f0) / h
        per_step.append({"h": h, "loss_h": fh, "loss_2h": f2h, "slope": slopes[h], "nu": nu})
    agreement = min((_agreement(slopes[a], slopes[b]) for a, b in itertools.combinations(slopes, 2)), default=None)
    worst_nu = max((p["nu"] for p in per_step), default=None)
    parts = [x for x in (None if worst_nu is None else 1 - min(1.0, worst_nu), agreement) if x is not None]
    score = min(parts) if parts else None
    return {"score": score, "threshold": threshold, "max_nu": worst_nu, "slope_agreement": agreement,
            "steps": [p["h"] for p in per_step], "per_step": per_step,
            "attributable": None if score is None else bool(score >= threshold)}


def _agreement(a: float, b: float) -> float:
    return max(0.0, 1.0 - abs(a - b) / max(abs(a), abs(b), TINY))


def attributability_sentence(summary: dict[str, Any]) -> str:
    """The verdict's first sentence where the check ran; "" where it did not."""
    s, yes = summary.get("smoothness"), summary.get("attributable")
    if not s or s.get("score") is None or yes is None:
        return ""
    steps = " and ".join(f"{h:g}" for h in s["steps"])
    figures = (f"smoothness {s['score']:.2f} {'≥' if yes else '<'} {s['threshold']:g}: along a random "
               f"direction at h = {steps}, linear extrapolation misses by up to {s['max_nu']:.0%} and the slopes "
               f"agree to {s['slope_agreement']:.0%}")
    lin = summary.get("linearity_spearman")
    if summary.get("linearity_eps") and lin is not None:
        big, small = summary["linearity_eps"]
        figures += f"; single occurrences at ε = {big:g} and {small:g} rank alike at Spearman {lin:.2f}"
    if yes:
        return (f"This run is attributable: its final loss responds linearly to reweighting its data ({figures}), "
                "so a first-order value can in principle predict what retraining does.")
    return (f"This run is not attributable: its final loss does not respond linearly to reweighting its data "
            f"({figures}), so no first-order value, these included, can predict what retraining does; read "
            "every value as a hypothesis, not a measurement.")
