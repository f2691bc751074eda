"""Update rows u = P ⊙ G from the capture hooks, against torch.func per-sample gradients in
float64 (docs/method.md §7), and the Adam preconditioner helpers against brute force."""

from __future__ import annotations

import pytest
import torch
from test_capture import make_data, make_model, project, reference_grads, sample_losses

from rayattr.capture import (
    GradientCapture,
    ProjectionSpec,
    adam_preconditioner,
    factor_second_moment,
    module_preconditioner,
)
from rayattr.capture.precondition import factors_from_sums, fragment_row_col_sums

F64 = torch.float64


def random_preconditioners(model, seed=0, step=5):
    """Per captured layer, a Preconditioner from a random exp_avg_sq spread over decades,
    with one all-zero input column (a feature that never had a gradient)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, info in GradientCapture(model).layer_info().items():
        v = torch.rand(info.d_out, info.d_in, generator=gen, dtype=F64) * 10 ** (-6 * torch.rand(1, generator=gen, dtype=F64))
        v[:, 0] = 0.0
        vb = torch.rand(info.d_out, generator=gen, dtype=F64) * 1e-4 if info.has_bias else None
        out[name] = adam_preconditioner(v, vb, step=step, beta2=0.999, eps=1e-8, full=True)
    return out


def brute_factored(v_hat, eps):
    """ρ_i γ_j from the definitions, entry by entry."""
    d_out, d_in = v_hat.shape
    f = [[max(float(v_hat[i, j]), eps * eps) for j in range(d_in)] for i in range(d_out)]
    r = [sum(row) for row in f]
    c = [sum(f[i][j] for i in range(d_out)) for j in range(d_in)]
    total = sum(r)
    return torch.tensor([[total ** 0.5 / (r[i] ** 0.5 * c[j] ** 0.5) for j in range(d_in)] for i in range(d_out)], dtype=F64)


@pytest.mark.parametrize("seq, mix", [(0, None), (6, None), (6, 5)], ids=["no-seq", "seq", "seq-mixed"])
def test_projected_update_rows_are_the_projection_of_factored_P_times_G(seq, mix):
    model = make_model(mix=True)
    x, y = make_data(seq=seq)
    pre = random_preconditioners(model)
    spec = ProjectionSpec(rank=3, seed=7, rank_out=2, mix=mix)
    ref = reference_grads(model, x, y)
    cap = GradientCapture(model, projection=spec, preconditioner=pre)
    with cap:
        sample_losses(model, x, y).sum().backward()
    grads, updates = cap.pop_rows()
    for name, G in ref.items():
        P = pre[name].rho[:, None] * pre[name].gamma[None, :]
        torch.testing.assert_close(grads[name], project(spec, name, G), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(updates[name], project(spec, name, P * G), rtol=1e-10, atol=1e-12)
    assert cap.updates()["fc1"].shape == (0, spec.dim)  # pop_rows reset


def test_exact_mode_uses_the_full_diagonal():
    model = make_model(mix=True)
    x, y = make_data(seq=6)
    pre = random_preconditioners(model, seed=1)
    ref = reference_grads(model, x, y)
    cap = GradientCapture(model, projection=None, preconditioner=pre)
    with cap:
        sample_losses(model, x, y).sum().backward()
    for name, u in cap.updates().items():
        torch.testing.assert_close(u, (pre[name].full * ref[name]).reshape(4, -1), rtol=1e-12, atol=1e-14)


def test_the_preconditioner_of_the_forward_is_used_and_none_gives_no_rows():
    model = make_model()
    x, y = make_data(seq=0)
    first, second = random_preconditioners(model, seed=2), random_preconditioners(model, seed=3)
    cap = GradientCapture(model, projection=None, preconditioner=first)
    ref = reference_grads(model, x, y)
    with cap:
        loss = sample_losses(model, x, y).sum()
        cap.set_preconditioner(second)  # a refresh between forward and backward
        loss.backward()
    torch.testing.assert_close(cap.updates()["fc1"], (first["fc1"].full * ref["fc1"]).reshape(4, -1))
    cap.set_preconditioner(None)
    with cap:
        sample_losses(model, x, y).sum().backward()
    assert cap.updates()["fc1"].shape == (0, cap.layer_dims()["fc1"])


def test_factoring_matches_its_definition_and_is_exact_for_rank_one():
    gen = torch.Generator().manual_seed(4)
    v = torch.rand(5, 4, generator=gen, dtype=F64) * 1e-6
    v[2] = 0.0  # a row under the floor
    rho, gamma = factor_second_moment(v, eps=1e-4)
    torch.testing.assert_close(rho[:, None] * gamma[None, :], brute_factored(v, 1e-4), rtol=1e-12, atol=0)
    assert torch.isfinite(rho).all() and torch.isfinite(gamma).all()
    # rank one v̂ = a bᵀ is factored exactly: ρ_i γ_j = 1/√v̂_ij
    a, b = torch.rand(5, generator=gen, dtype=F64) + 0.1, torch.rand(4, generator=gen, dtype=F64) + 0.1
    rho, gamma = factor_second_moment(torch.outer(a, b), eps=1e-12)
    torch.testing.assert_close(rho[:, None] * gamma[None, :], 1 / torch.outer(a, b).sqrt(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv1d"])
def test_module_preconditioner_is_what_adamw_divides_by(conv):
    """After a step of torch.optim.AdamW (no decay), the weight moved by lr · m̂ ⊙ P_full."""
    model = make_model()
    module = model.conv if conv else model.fc1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0)
    x, y = make_data(seq=0)
    for _ in range(3):
        opt.zero_grad()
        sample_losses(model, x, y).sum().backward()
        before = torch.cat([module.weight.detach().clone().reshape(module.weight.shape), module.bias.detach().clone()[None]], 0) \
            if conv else torch.cat([module.weight.detach().clone(), module.bias.detach().clone()[:, None]], 1)
        opt.step()
    pre = module_preconditioner(module, opt, full=True)
    assert pre.step == 3
    sw, sb = opt.state[module.weight], opt.state[module.bias]
    if conv:  # Conv1D stores (d_in, d_out): G's orientation is its transpose
        moved = (before - torch.cat([module.weight.detach(), module.bias.detach()[None]], 0)).T
        m = torch.cat([sw["exp_avg"], sb["exp_avg"][None]], 0).T
    else:
        moved = before - torch.cat([module.weight.detach(), module.bias.detach()[:, None]], 1)
        m = torch.cat([sw["exp_avg"], sb["exp_avg"][:, None]], 1)
    torch.testing.assert_close(moved, 1e-2 * m / (1 - 0.9 ** 3) * pre.full, rtol=1e-9, atol=1e-15)


def test_bad_preconditioners_are_clear_errors():
    model = make_model()
    pre = random_preconditioners(model)
    with pytest.raises(KeyError, match="missing for layers"):
        GradientCapture(model, projection=ProjectionSpec(rank=2), preconditioner={"fc1": pre["fc1"]})
    with pytest.raises(ValueError, match="shape"):
        GradientCapture(model, projection=ProjectionSpec(rank=2), preconditioner={**pre, "fc1": pre["conv"]})
    factored_only = {n: adam_preconditioner(p.full, step=1) for n, p in pre.items()}
    with pytest.raises(ValueError, match="full"):
        GradientCapture(model, projection=None, preconditioner=factored_only)
    with pytest.raises(ValueError, match="step counter"):
        adam_preconditioner(torch.ones(2, 2), step=0)


@pytest.mark.parametrize("seq, mix", [(0, None), (6, None), (6, 5)], ids=["no-seq", "seq", "seq-mixed"])
def test_deferred_update_rows_equal_the_brute_force_with_the_later_preconditioner(seq, mix):
    """defer_updates: the factors wait, and finish_updates(P) forms P ⊙ G's projection with a P
    given only after the backward; a reused layer's two calls add up as the gradient does."""
    model = make_model(mix=True)
    x, y = make_data(seq=seq)
    pre = random_preconditioners(model, seed=4)
    spec = ProjectionSpec(rank=3, seed=7, rank_out=2, mix=mix)
    ref = reference_grads(model, x, y)
    cap = GradientCapture(model, projection=spec, defer_updates=True)
    with cap:
        sample_losses(model, x, y).sum().backward()
    assert cap.deferred_bytes() > 0
    with pytest.raises(RuntimeError, match="finish_updates"):
        cap.updates()
    cap.finish_updates(pre)
    assert cap.deferred_bytes() == 0
    updates = cap.updates()
    for name, G in ref.items():
        P = pre[name].rho[:, None] * pre[name].gamma[None, :]
        torch.testing.assert_close(updates[name], project(spec, name, P * G), rtol=1e-10, atol=1e-12)


def test_deferred_exact_rows_use_the_full_diagonal_and_none_frees_the_factors():
    model = make_model(mix=True)
    x, y = make_data(seq=6)
    pre = random_preconditioners(model, seed=5)
    ref = reference_grads(model, x, y)
    cap = GradientCapture(model, projection=None, defer_updates=True)
    with cap:
        sample_losses(model, x, y).sum().backward()
    cap.finish_updates(pre)
    for name, u in cap.updates().items():
        torch.testing.assert_close(u, (pre[name].full * ref[name]).reshape(4, -1), rtol=1e-12, atol=1e-14)
    projected = GradientCapture(model, projection=ProjectionSpec(rank=2), defer_updates=True)
    with projected:
        sample_losses(model, x, y).sum().backward()
    projected.finish_updates(None)  # no v yet: the caller stores u = g
    assert projected.deferred_bytes() == 0
    assert projected.updates()["fc1"].shape == (0, 4)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-6), (F64, 1e-13)])
@pytest.mark.parametrize("shape", [(7, 5), (11,), (3, 1)])
def test_fragment_sums_add_up_to_the_whole_floored_state(shape, dtype, rtol):
    """Every split of the flattened state into contiguous fragments (ZeRO's partitions fall
    anywhere in a parameter) gives row and column sums that add up to the brute force's: to
    float32 rounding for a float32 state (its entries are floored and summed in float32), to
    float64's for a float64 one."""
    gen = torch.Generator().manual_seed(0)
    v = (torch.rand(shape, generator=gen, dtype=torch.float32) * 1e-3).to(dtype)
    v.reshape(-1)[::3] = 0.0  # entries under the floor
    correction, eps = 0.3, 1e-3
    full = v.to(F64).reshape(shape[0], -1)
    rows = [sum(max(float(full[i, j]) / correction, eps * eps) for j in range(full.shape[1])) for i in range(full.shape[0])]
    cols = [sum(max(float(full[i, j]) / correction, eps * eps) for i in range(full.shape[0])) for j in range(full.shape[1])]
    n = v.numel()
    for cuts in ([], [1], [n // 2], [2, 3, n - 1], list(range(1, n))):
        cuts = sorted({k for k in cuts if 0 < k < n})
        r = torch.zeros(len(rows), dtype=F64)
        c = torch.zeros(len(cols), dtype=F64)
        for lo, hi in zip([0] + cuts, cuts + [n]):
            fr, fc = fragment_row_col_sums(v.reshape(-1)[lo:hi], lo, shape, correction, eps)
            r, c = r + fr, c + fc
        torch.testing.assert_close(r, torch.tensor(rows, dtype=F64), rtol=rtol, atol=0)
        torch.testing.assert_close(c, torch.tensor(cols, dtype=F64), rtol=rtol, atol=0)


def test_factors_from_partition_sums_are_those_of_the_whole_state():
    gen = torch.Generator().manual_seed(1)
    v_hat = torch.rand(6, 4, generator=gen, dtype=F64) * 1e-5
    rho, gamma = factor_second_moment(v_hat, 1e-8)
    torch.testing.assert_close(rho[:, None] * gamma[None, :], brute_factored(v_hat, 1e-8), rtol=1e-12, atol=0)
    r, c = fragment_row_col_sums(v_hat.float().reshape(-1), 0, (6, 4), 1.0, 1e-8)
    rho2, gamma2 = factors_from_sums(r, c)
    torch.testing.assert_close(rho2[:, None] * gamma2[None, :], brute_factored(v_hat.float().double(), 1e-8),
                               rtol=1e-6, atol=0)  # a float32 state's sums are float32's


def test_members_take_the_preconditioner_of_their_module():
    """With ProjectionSpec.members, preconditioners stay keyed by module: every member's
    deferred update rows are its own projection of the module's P ⊙ G."""
    model = make_model(mix=True)
    x, y = make_data(seq=6)
    pre = random_preconditioners(model, seed=2)
    spec = ProjectionSpec(rank=3, seed=7, rank_out=2, members=2)
    ref = reference_grads(model, x, y)
    cap = GradientCapture(model, projection=spec, defer_updates=True)
    with cap:
        sample_losses(model, x, y).sum().backward()
    cap.finish_updates(pre)
    updates = cap.updates()
    for name, G in ref.items():
        P = pre[name].rho[:, None] * pre[name].gamma[None, :]
        for member in (name, name + "~1"):
            torch.testing.assert_close(updates[member], project(spec, member, P * G), rtol=1e-10, atol=1e-12)
    with pytest.raises(KeyError, match="preconditioner missing"):
        cap.set_preconditioner({n: p for n, p in pre.items() if n != "conv"})
