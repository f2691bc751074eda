#!/usr/bin/env python
"""How sharp is an AdamW run at chosen steps, per captured weight matrix, as the recursion's K
sees it: κ_t·lr_t·λ_max(P_t G_t) with G_t the step's Gauss–Newton matrix (what the sampled-label
Fisher estimates), P_t exact (1/(√v̂ + ε), elementwise) against the capture's Adafactor-factored
P (ρ γᵀ from v̂'s row and column sums, rayattr/capture/precondition.py).

    python bench/sharpness_adamw.py RUN --steps 24,26 [--iterations 20]

Replays the run in float64 (bench/exact_adamw.AdamWReplay, re-seated on the states it kept) up
to the last step asked for, then power-iterates on x ↦ P ⊙ (G x) restricted to each matrix (its
diagonal block, as a per-layer K holds it). Against Adam's own stability edge 2(1+β₁)/(1−β₁)
(38 at β₁ = 0.9) and the guard's `max_eta_lambda` (the empirical Fisher's, in run.json).
Seconds per step and matrix for the built-in model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from exact_adamw import AdamWReplay, captured_parameters  # noqa: E402
from rayattr.capture.precondition import factor_second_moment  # noqa: E402
from rayattr.exact.replay import sqrt0  # noqa: E402
from rayattr.store import Run  # noqa: E402


def top_eigenvalue(product, like: torch.Tensor, iterations: int) -> float:
    """λ_max of a linear map on tensors shaped like `like`, by power iteration (P G is similar to
    P^½ G P^½: real, non-negative spectrum)."""
    x = torch.randn(like.shape, generator=torch.Generator().manual_seed(0), dtype=like.dtype)
    lam = 0.0
    for _ in range(iterations):
        y = product(x)
        lam = float(y.norm() / x.norm())
        if lam == 0.0:
            return 0.0
        x = y / y.norm()
    return lam


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--steps", required=True, help="steps, comma-separated")
    ap.add_argument("--iterations", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    run = Run.open_uri(args.run)
    rp = AdamWReplay(run)
    steps = sorted(int(s) for s in args.steps.split(","))
    keep = captured_parameters(rp)
    edge = 2 * (1 + rp.beta1) / (1 - rp.beta1)
    print(f"{run.uri}: Adam's edge {edge:.3g}; the guard's empirical-Fisher max "
          f"{run.manifest.get('max_eta_lambda')} at step {run.manifest.get('max_eta_lambda_step')}")
    state, anchors = rp.initial_state(), set(rp.anchor_steps())
    ones = torch.ones(rp.batch(0)[1].shape[0], dtype=torch.float64)
    for t in range(steps[-1] + 1):
        if t in anchors:
            state = rp.recorded_state(t)
        theta = state.params
        state, kappa, _ = rp.step(state, t, ones, differentiable=False)
        if t not in steps:
            continue
        k = rp.records[t].adam_step or t + 1
        batch, _ = rp.batch(t)
        scale = kappa * rp.records[t].lr
        print(f"step {t} (κ {kappa:.3f}, lr {rp.records[t].lr:.3g}, loss {rp.records[t].loss:.3f}): "
              "κ·lr·λ_max(P G), exact P / factored P")
        for name in sorted(keep):
            if theta[name].dim() != 2:
                continue
            v_hat = state.v[name] / (1 - rp.beta2 ** k)
            rho, gamma = factor_second_moment(v_hat.T, rp.eps)  # the capture's (d_out, d_in) orientation
            pre = {"exact": 1 / (sqrt0(v_hat) + rp.eps), "factored": (rho[:, None] * gamma[None, :]).T}

            def product(x, P):
                probe = {m: (x if m == name else torch.zeros_like(p)) for m, p in theta.items()}
                return P * rp.ggn_vector_product(theta, batch, probe)[name]

            lams = {kind: scale * top_eigenvalue(lambda x: product(x, P), theta[name], args.iterations)
                    for kind, P in pre.items()}
            print(f"  {name}: {lams['exact']:.3g} / {lams['factored']:.3g}", flush=True)


if __name__ == "__main__":
    main()
