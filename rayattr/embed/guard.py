"""Divergence guard for the DVEmb sweep: a segment stops at the first step whose K or
embeddings are non-finite or exploding, naming the step and why, instead of writing NaN on.

Why a bound on K: K = Π (α I - η P H) with P H similar to a positive semi-definite matrix
has spectral norm <= 1 while η·λ_max(P H) <= 2 at every step (P = I under SGD); each step
above 2 can stretch it. Its RMS singular value ‖K‖_F / √p (cheap, and <= the spectral norm)
beyond K_RMS_LIMIT means the recursion is amplifying, not attributing. η·λ_max(P H) itself is
estimated per step from the recorded rows (power iteration on Uᵀ G) and reported above 2.

The run's own stability edge is a different number once there is momentum: heavy-ball
dynamics with Adam's β₁ stay bounded on a quadratic while η·λ_max(P H) < 2(1 + β₁)/(1 − β₁)
(38 at β₁ = 0.9; docs/method.md §7, "Stability"). Between 2 and that edge the run is stable
but the momentum-free K amplifies, so its values are not to be trusted there either.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch

from rayattr.errors import RayattrError

log = logging.getLogger(__name__)

K_RMS_LIMIT = 1e6
ETA_LAMBDA_WARN = 2.0  # the momentum-free K's own contraction bound


def stability_edge(momentum: float = 0.0) -> float:
    """The largest η·λ_max(P H) at which gradient descent with EMA momentum β₁ (Adam's m,
    bias correction aside) is stable on a quadratic: 2(1 + β₁)/(1 − β₁); 2 without momentum."""
    return 2.0 * (1.0 + momentum) / (1.0 - momentum)


def describe(eta_lambda: float, momentum: float = 0.0) -> str:
    """One clause saying which bound a step's η·λ_max(P H) passes, for warnings and reports."""
    edge = stability_edge(momentum)
    if momentum and eta_lambda >= edge:
        return f"past the run's own stability edge 2(1+β₁)/(1−β₁) = {edge:.3g}: training itself was unstable here"
    if eta_lambda > ETA_LAMBDA_WARN:
        tail = (f"; the run stays below its stability edge {edge:.3g}, but the recursion does not contract"
                if momentum else "")
        return f"above {ETA_LAMBDA_WARN:g}: the step can amplify K{tail}"
    return f"within {ETA_LAMBDA_WARN:g}: the recursion contracts"


def clipping_note(clipped: int, steps: int, corrected: bool = False) -> str:
    """What holding the clip factor κ costs, for a run clipped at `clipped` of its `steps`.

    A clipped step moves along κḡ with ‖κḡ‖ fixed, so one sample's weight turns the step
    rather than lengthening it: its exact response is κ (I − ĝĝᵀ) g, without the component
    along the batch's mean gradient ĝ. The recursion holds κ and keeps that component, which
    is most of a sample's inner product with a test gradient: on the runs of bench/regime.py
    the last step's values came out 3–7× the exact response (docs/method.md §9). `corrected`:
    the run was embedded with embed.clip_response, which gives those steps their own rows."""
    if corrected:
        return (f"gradient clipping acted at {clipped} of {steps} steps; with embed.clip_response the values take "
                "each clipped step's own response to a sample, without its component along the batch's mean "
                "gradient (docs/method.md §9)")
    return (f"gradient clipping acted at {clipped} of {steps} steps; the values hold its factor κ fixed, so at those "
            "steps they keep each sample's component along the batch's mean gradient, which clipping takes out of "
            "its real effect: there they can be several times too large (embed.clip_response corrects it; "
            "docs/method.md §9)")


class DivergenceError(RayattrError, RuntimeError):
    """The DVEmb recursion produced non-finite or exploding values at a named step."""


def eta_lambda_max(grads: Mapping[str, torch.Tensor], eta: float,
                   curvature: Mapping[str, torch.Tensor] | None = None, batch_size: int | None = None,
                   updates: Mapping[str, torch.Tensor] | None = None,
                   curvature_updates: Mapping[str, torch.Tensor] | None = None) -> float:
    """Largest η·λ_max(P_t H_t) over the layers of ``grads``: H = Σ g gᵀ of the rows, or
    (B/m) Σ ĝ ĝᵀ of the curvature rows; P H = Σ u gᵀ with AdamW's update rows u = P g
    (``updates``, the rows K's curvature term uses; SGD: u = g), or Σ P ĝ ĝᵀ with the
    curvature rows' own (``curvature_updates``)."""
    rows = curvature if curvature is not None else grads
    steps = curvature_updates if curvature is not None else updates
    out = 0.0
    for name, g in rows.items():
        if g.shape[0] == 0:
            continue
        u = steps[name] if steps is not None else g
        scale = (batch_size or g.shape[0]) / g.shape[0] if curvature is not None else 1.0
        out = max(out, eta * scale * _top_eigenvalue(g.double(), u.double()))
    return out


def _top_eigenvalue(g: torch.Tensor, u: torch.Tensor, iterations: int = 30) -> float:
    """λ_max(uᵀ g) by power iteration: 2·B·p per round, against the B·p² of a recursion step
    (an exact eigendecomposition would cost as much as the step itself). uᵀ g = P H is
    similar to P^½ H P^½, so its spectrum is real and non-negative and the iteration's growth
    rate converges to λ_max from below."""
    v = torch.randn(g.shape[1], generator=torch.Generator().manual_seed(0), dtype=g.dtype)
    v = v / v.norm()
    lam = 0.0
    for _ in range(iterations):
        w = u.T @ (g @ v)
        lam = float(w.norm())
        if lam == 0.0 or not math.isfinite(lam):
            return lam
        v = w / lam
    return lam


def eta_lambda_name(preconditioned: bool) -> str:
    """What the guard measured: η·λ_max(P H) when K sees update rows (AdamW, whatever its β₁),
    η·λ_max(H) under SGD."""
    return "η·λ_max(P H)" if preconditioned else "η·λ_max(H)"


WHOSE_H = "H: the curvature K holds, a Fisher of the per-sample gradients, not the loss's Hessian"
"""Said beside the figure: a reader takes H for the Hessian, whose top eigenvalue differs from the
Fisher's by several times either way (docs/method.md §9)."""


def check_step(segment: int, step: int, K: Mapping[str, torch.Tensor], emb: Mapping[str, torch.Tensor],
               eta_lambda: float, momentum: float = 0.0, preconditioned: bool = False) -> None:
    """DivergenceError if this step left K or its embeddings non-finite or K exploding."""
    why = f"({eta_lambda_name(preconditioned)} = {eta_lambda:.3g} at this step, {describe(eta_lambda, momentum)})"
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
