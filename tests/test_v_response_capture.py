"""The second-moment response rows y = M_t ⊙ G from the capture (docs/method.md §7, "v's
response"), against torch.func per-sample gradients in float64: exact mode on the formed row,
projected mode through M's SVD factors (exact at full rank, the truncation's own brute force
below it), formed from the factors kept for the deferred update rows."""

from __future__ import annotations

import pytest
import torch
from test_capture import make_data, make_model, project, reference_grads, sample_losses

from rayattr.capture import GradientCapture, ProjectionSpec, response_factors
from rayattr.capture.precondition import Response
from test_capture_precondition import random_preconditioners

F64 = torch.float64


def random_responses(model, seed=0) -> dict[str, torch.Tensor]:
    """Per captured layer a signed full-rank M (d_out, d_in_aug), spread over decades."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, info in GradientCapture(model).layer_info().items():
        scale = 10 ** (-3 * torch.rand(info.d_out, 1, generator=gen, dtype=F64))
        out[name] = torch.randn(info.d_out, info.d_in_aug, generator=gen, dtype=F64) * scale
    return out


def captured(model, x, y, projection):
    cap = GradientCapture(model, projection=projection, defer_updates=True)
    with cap:
        sample_losses(model, x, y).sum().backward()
    return cap


def test_response_factors_are_the_truncated_svd():
    M = random_responses(make_model(mix=True))["fc1"]
    full = response_factors(M, 100)
    torch.testing.assert_close(full.x.T @ full.y, M, rtol=1e-12, atol=1e-14)
    one = response_factors(M, 1, keep_full=True)
    U, S, Vh = torch.linalg.svd(M)
    torch.testing.assert_close(one.x.T @ one.y, S[0] * torch.outer(U[:, 0], Vh[0]), rtol=1e-12, atol=1e-14)
    assert torch.equal(one.full, M)
    with pytest.raises(ValueError, match="rank"):
        response_factors(M, 0)


@pytest.mark.parametrize("seq", [0, 6], ids=["no-seq", "seq"])
def test_exact_rows_are_M_times_G(seq):
    model = make_model(mix=True)
    x, y = make_data(seq=seq)
    M = random_responses(model, seed=1)
    ref = reference_grads(model, x, y)
    cap = captured(model, x, y, None)
    cap.finish_updates(random_preconditioners(model, seed=2),
                       {n: response_factors(m, 1, keep_full=True) for n, m in M.items()})
    for name, G in ref.items():
        torch.testing.assert_close(cap.responses()[name], (M[name] * G).reshape(G.shape[0], -1),
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seq, mix", [(0, None), (6, None), (6, 5)], ids=["no-seq", "seq", "seq-mixed"])
def test_projected_rows_are_the_projection_of_M_times_G(seq, mix):
    """Full rank: Π(M ⊙ G) exactly; rank 1: Π(M₁ ⊙ G) with M₁ the leading singular pair. The
    update rows from the same kept factors are unchanged by forming the responses first. With
    capture.mix, Π includes the dense second stage, applied once to the sum over k."""
    model = make_model(mix=True)
    x, y = make_data(seq=seq)
    M = random_responses(model, seed=3)
    pre = random_preconditioners(model, seed=4)
    spec = ProjectionSpec(rank=3, seed=7, rank_out=2, mix=mix)
    ref = reference_grads(model, x, y)
    for rank in (1, 100):
        cap = captured(model, x, y, spec)
        with pytest.raises(RuntimeError, match="finish_updates"):
            cap.responses()
        factors = {n: response_factors(m, rank) for n, m in M.items()}
        cap.finish_updates(pre, factors)
        assert cap.deferred_bytes() == 0
        for name, G in ref.items():
            Mk = factors[name].x.T @ factors[name].y
            if rank == 100:
                torch.testing.assert_close(Mk, M[name], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(cap.responses()[name], project(spec, name, Mk * G), rtol=1e-10, atol=1e-14)
            P = pre[name].rho[:, None] * pre[name].gamma[None, :]
            torch.testing.assert_close(cap.updates()[name], project(spec, name, P * G), rtol=1e-10, atol=1e-12)


def test_no_response_leaves_no_rows_and_bad_factors_are_refused():
    model = make_model(mix=True)
    x, y = make_data(seq=6)
    cap = captured(model, x, y, ProjectionSpec(rank=2))
    cap.finish_updates(random_preconditioners(model))
    assert cap.responses()["fc1"].shape == (0, 4)
    cap = captured(model, x, y, ProjectionSpec(rank=2))
    with pytest.raises(KeyError, match="response missing"):
        cap.finish_updates(None, {})
    cap = captured(model, x, y, ProjectionSpec(rank=2))
    bad = {n: Response(torch.ones(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64)) for n in cap.layer_names()}
    with pytest.raises(ValueError, match="response factors"):
        cap.finish_updates(None, bad)
    cap = captured(model, x, y, None)
    with pytest.raises(ValueError, match="full"):
        cap.finish_updates(None, {n: Response(torch.ones(1, 2), torch.ones(1, 2)) for n in cap.layer_names()})
