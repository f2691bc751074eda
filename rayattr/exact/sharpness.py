"""How sharp a run is where it ends, along the direction its values are measured in
(docs/method.md §10, "Sharpness").

A recursion step is K = I − η·H. Once η·⟨w, H w⟩/‖w‖² exceeds 1 along the validation gradient w,
one step back turns w's component past zero; plain gradient descent drifts there by itself (its
top η·λ rises towards 2, the edge of stability). The values' K holds a Fisher of the step's
per-sample gradients, which can see far less of H than that: the figures here say whether it had
to see more. SGD runs only: under AdamW the operator is η·P·H with momentum, and its edge differs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rayattr.exact.replay import Replay

Vectors = list[torch.Tensor]

TURNS = 1.0
"""η·⟨w, H w⟩/‖w‖² above which one step of K = I − η·H reverses w's component along itself."""


def _dot(a: Vectors, b: Vectors) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b)))


def top_eigenvalue(hvp: Callable[[Vectors], Vectors], like: Vectors, iterations: int = 20, seed: int = 0) -> float:
    """The eigenvalue of largest magnitude of the symmetric operator hvp, with its sign: power
    iteration from a seeded normal start, the last iterate's Rayleigh quotient."""
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in like]
    lam = 0.0
    for _ in range(iterations):
        n = _dot(v, v) ** 0.5
        if n == 0.0:
            return 0.0
        v = [x / n for x in v]
        hv = hvp(v)
        lam = _dot(v, hv)
        v = hv
    return lam


def end_sharpness(replay: Replay, params: dict[str, torch.Tensor], val_grad: Vectors,
                  iterations: int = 20) -> dict | None:
    """At the final weights, on the last step's global batch and with that step's size η = κ·lr
    (float64 Hessian-vector products): η·λ_max(H), η·⟨w, H w⟩/‖w‖² and η·‖H w‖/‖w‖ for w the
    validation gradient, beside the Fisher's η·λ_max the segment actors measured. None for an
    AdamW run."""
    if replay.optimizer == "adamw":
        return None
    t = replay.num_steps - 1
    eta = replay.records[t].eta * replay.batch_size()  # the recorded κ·lr/|B| times |B|
    leaves = [x.detach().requires_grad_(True) for x in params.values()]
    named = dict(zip(params, leaves))
    batch, _ = replay.batch(t)
    with torch.enable_grad():
        grads = torch.autograd.grad(replay.per_sample(named, batch).mean(), leaves, create_graph=True)

        def hvp(v: Vectors) -> Vectors:
            return [x.detach() for x in torch.autograd.grad(grads, leaves, grad_outputs=v, retain_graph=True)]

        w = [x.detach() for x in val_grad]
        hw = hvp(w)
        ww = _dot(w, w)
        lam = top_eigenvalue(hvp, w, iterations)
    along = eta * _dot(w, hw) / ww if ww else 0.0
    return {"step": t, "eta": eta, "eta_lambda_max": eta * lam, "eta_along_validation": along,
            "eta_h_validation_ratio": eta * _dot(hw, hw) ** 0.5 / ww ** 0.5 if ww else 0.0,
            "fisher_eta_lambda_max": replay.run.manifest.get("max_eta_lambda"),
            "turns": bool(along > TURNS), "iterations": iterations}


def sharpness_sentence(s: dict | None) -> str | None:
    """The figures in words, for the command and the report (None where not measured)."""
    if not s:
        return None
    fisher = s.get("fisher_eta_lambda_max")
    text = (f"at its end the run's step has η·λ_max(H) = {s['eta_lambda_max']:.2f} and "
            f"η·⟨w, H w⟩/‖w‖² = {s['eta_along_validation']:.2f} along the validation gradient w"
            + (f" (the Fisher in the values' K: η·λ_max {fisher:.2f})" if fisher is not None else ""))
    if s["turns"]:
        text += (f"; above {TURNS:g}, one step back turns w past zero, which a Fisher-curvature recursion "
                 "follows only in part (docs/method.md §9): trust the exact values over the run's values")
    return text
