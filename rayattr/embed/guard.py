"""Divergence guard for the DVEmb sweep: a segment stops at the first step whose K or
embeddings are non-finite or exploding, naming the step and why, instead of writing NaN on.

Why a bound on K: K = Π (I - η H) with H positive semi-definite has spectral norm <= 1 while
η·λ_max(H) <= 2 at every step; each step above 2 can stretch it. Its RMS singular value
‖K‖_F / √p (cheap, and <= the spectral norm) beyond K_RMS_LIMIT means the recursion is
amplifying, not attributing. η·λ_max(H) itself is estimated per step from the recorded rows
(λ_max(Σ g gᵀ) = σ_max(G)², an SVD of the small B×p side) and reported when above 2.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch

from rayattr.errors import RayattrError

log = logging.getLogger(__name__)

K_RMS_LIMIT = 1e6
ETA_LAMBDA_WARN = 2.0


class DivergenceError(RayattrError, RuntimeError):
    """The DVEmb recursion produced non-finite or exploding values at a named step."""


def eta_lambda_max(grads: Mapping[str, torch.Tensor], eta: float,
                   curvature: Mapping[str, torch.Tensor] | None = None, batch_size: int | None = None) -> float:
    """Largest η·λ_max(H_t) over layers: H = Σ g gᵀ of the rows, or (B/m) Σ ĝ ĝᵀ of the
    curvature rows."""
    rows = curvature if curvature is not None else grads
    out = 0.0
    for g in rows.values():
        if g.shape[0] == 0:
            continue
        scale = (batch_size or g.shape[0]) / g.shape[0] if curvature is not None else 1.0
        out = max(out, eta * scale * _top_eigenvalue(g.double()))
    return out


def _top_eigenvalue(g: torch.Tensor, iterations: int = 20) -> float:
    """λ_max(gᵀ g) by power iteration: 2·B·p per round, against the B·p² of a recursion step
    (an exact SVD would cost as much as the step itself). A slight underestimate at worst."""
    v = torch.randn(g.shape[1], generator=torch.Generator().manual_seed(0), dtype=g.dtype)
    lam = 0.0
    for _ in range(iterations):
        w = g.T @ (g @ v)
        lam = float(w.norm())
        if lam == 0.0 or not math.isfinite(lam):
            return lam
        v = w / lam
    return lam


def check_step(segment: int, step: int, K: Mapping[str, torch.Tensor], emb: Mapping[str, torch.Tensor],
               eta_lambda: float) -> None:
    """DivergenceError if this step left K or its embeddings non-finite or K exploding."""
    why = f"(η·λ_max(H) = {eta_lambda:.3g} at this step)"
    for name, e in emb.items():
        if not bool(torch.isfinite(e).all()):
            raise DivergenceError(f"segment {segment}: embeddings of layer {name!r} are not finite at step {step} {why}")
    for name, k in K.items():
        if not bool(torch.isfinite(k).all()):
            raise DivergenceError(f"segment {segment}: K of layer {name!r} is not finite at step {step} {why}")
        rms = float(torch.linalg.matrix_norm(k.double())) / math.sqrt(k.shape[0])
        if rms > K_RMS_LIMIT:
            raise DivergenceError(f"segment {segment}: K of layer {name!r} is exploding at step {step}: "
                                  f"RMS singular value {rms:.3g} > {K_RMS_LIMIT:g} {why}")


def check_values(values: torch.Tensor, steps, where: str) -> None:
    """DivergenceError naming the first step with a non-finite value (never written)."""
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        first = int(torch.as_tensor(steps)[bad.nonzero()[0, 0]])
        raise DivergenceError(f"{where}: {int(bad.sum())} value(s) are not finite, "
                              f"the first at step {first}; not writing them")
