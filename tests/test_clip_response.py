"""A clipped step's own response to a sample (embed.clip_response; docs/method.md §9): the
rows dvemb.clipped_step_rows gives against an explicit float64 formula, and the value of an
occurrence at the run's last step against the exact derivative of the validation loss through
a clipped SGD step, on a model whose every parameter is captured."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

from rayattr.math.dvemb import clipped_step_rows

F64 = torch.float64


def explicit(g: dict, u: dict) -> dict:
    """ũ_i = u_i − ū ⟨g_i, ḡ⟩/‖ḡ‖², the inner products over every layer, one row at a time."""
    gbar = {n: x.mean(0) for n, x in g.items()}
    norm2 = sum(float((x * x).sum()) for x in gbar.values())
    out = {}
    for n in u:
        rows = []
        for i in range(u[n].shape[0]):
            s = sum(float((g[m][i] * gbar[m]).sum()) for m in g)
            rows.append(u[n][i] - u[n].mean(0) * s / norm2)
        out[n] = torch.stack(rows)
    return out


def test_clipped_rows_are_the_explicit_formula_over_every_layer():
    gen = torch.Generator().manual_seed(0)
    g = {"a": torch.randn(5, 4, generator=gen, dtype=F64), "b": torch.randn(5, 3, generator=gen, dtype=F64)}
    u = {n: x * (1 + torch.rand(x.shape[1], generator=gen, dtype=F64)) for n, x in g.items()}  # u = P ⊙ g
    got, want = clipped_step_rows(g, u), explicit(g, u)
    for n in g:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-14)
    # under SGD (u = g) the rows are orthogonal to ḡ over all layers together, not layer by layer
    sgd = clipped_step_rows(g, g)
    gbar = {n: x.mean(0) for n, x in g.items()}
    torch.testing.assert_close(sum(sgd[n] @ gbar[n] for n in g), torch.zeros(5, dtype=F64), atol=1e-12, rtol=0)
    assert float((sgd["a"] @ gbar["a"]).abs().max()) > 1e-3
    # K's curvature term Σ ũ gᵀ is (I − ĝĝᵀ) Σ u gᵀ, the clip's Jacobian (one layer: ĝ is its own)
    one = {"a": g["a"]}
    ghat = g["a"].mean(0) / g["a"].mean(0).norm()
    proj = torch.eye(4, dtype=F64) - torch.outer(ghat, ghat)
    torch.testing.assert_close(clipped_step_rows(one, one)["a"].T @ g["a"], proj @ (g["a"].T @ g["a"]), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("clip", [0.05, 1e3], ids=["clipped", "not clipped"])
def test_the_last_steps_value_is_the_clipped_steps_exact_response(clip):
    """θ₁ = θ₀ − lr·κ(w)·ḡ(w) with ḡ(w) = Σ wᵢ gᵢ / B and κ = min(1, c/‖ḡ‖): −∂ℓ_val(θ₁)/∂w_z
    by autograd equals η ⟨∇ℓ_val(θ₁), ũ_z⟩ (η = lr·κ/B) with the clipped step's rows, to
    float64 rounding; κ g alone misses it where the step was clipped."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    xv, yv = torch.randn(5, 4, dtype=F64), torch.randint(0, 3, (5,))
    lr, B = 0.5, x.shape[0]

    def loss(params, xb, yb):
        return torch.nn.functional.cross_entropy(functional_call(model, params, (xb,)), yb, reduction="none")

    def step(w):
        g = torch.autograd.grad((w * loss(theta0, x, y)).sum() / B, list(theta0.values()), create_graph=True)
        norm = torch.sqrt(sum((t * t).sum() for t in g))
        kappa = torch.clamp(clip / norm, max=1.0)
        return {n: p - lr * kappa * t for (n, p), t in zip(theta0.items(), g)}, float(kappa)

    theta0 = {n: p.requires_grad_(True) for n, p in theta0.items()}
    w = torch.ones(B, dtype=F64, requires_grad=True)
    theta1, kappa = step(w)
    exact = -torch.autograd.grad(loss(theta1, xv, yv).mean(), w)[0]
    assert (kappa < 1) == (clip < 1)

    t1 = {n: p.detach() for n, p in theta1.items()}
    test = grad(lambda p: loss(p, xv, yv).mean())(t1)
    rows = vmap(grad(lambda p, xi, yi: loss(p, xi[None], yi[None]).sum()), in_dims=(None, 0, 0))(
        {n: p.detach() for n, p in theta0.items()}, x, y)
    g = {n: r.reshape(B, -1) for n, r in rows.items()}  # every parameter a "layer", unprojected
    eta = lr * kappa / B
    u = clipped_step_rows(g, g) if kappa < 1 else g
    value = eta * sum(u[n] @ test[n].reshape(-1) for n in g)
    torch.testing.assert_close(value, exact, rtol=1e-9, atol=1e-12)
    held = eta * sum(g[n] @ test[n].reshape(-1) for n in g)  # κ g: what the recursion did before
    if kappa < 1:
        assert float((held - exact).abs().max()) > 0.1 * float(exact.abs().max())
