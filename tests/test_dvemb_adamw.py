"""The AdamW form of the DVEmb recursion (docs/method.md §7) against the explicit formula

    DVEmb(t, z) = Σ_{s≥t} w_{t,s} eta_s K_{s+1→} u_z,   w_{t,s} = (1-β₁) β₁^(s-t) / (1-β₁^(s+1))

with every K product formed explicitly, in float64."""

import pytest
import torch

from rayattr.math.dvemb import (
    SegmentRecursion,
    data_value_embeddings,
    finalise_step,
    momentum_weight,
    segment_bounds,
    segment_combine,
    segment_embeddings,
)
from tests.test_dvemb import W, dvemb_one_layer, one_layer

F64 = torch.float64


def step_jacobians(grads, updates, etas, decay, curvature=None, curv_updates=None, batch_sizes=None):
    """K_s = α_s I - eta_s Σ u gᵀ, or α_s I - eta_s (B/m) Σ û ĝᵀ with sampled-label rows."""
    p = grads[0].shape[1]
    Ks = []
    for s in range(len(grads)):
        if curvature is None:
            PH = updates[s].T @ grads[s]
        else:
            B = batch_sizes[s] if batch_sizes is not None else grads[s].shape[0]
            PH = B / curvature[s].shape[0] * curv_updates[s].T @ curvature[s]
        Ks.append(decay[s] * torch.eye(p, dtype=F64) - etas[s] * PH)
    return Ks


def brute_force(grads, updates, etas, beta, decay, **curv):
    T, p = len(grads), grads[0].shape[1]
    Ks = step_jacobians(grads, updates, etas, decay, **curv)

    def suffix(s):  # K_{s+1→} = K_{T-1} ⋯ K_{s+1}
        P = torch.eye(p, dtype=F64)
        for k in range(s + 1, T):
            P = Ks[k] @ P
        return P

    out = []
    for t in range(T):
        emb = torch.zeros_like(updates[t])
        for s in range(t, T):
            w = (1 - beta) * beta ** (s - t) / (1 - beta ** (s + 1))
            emb = emb + w * etas[s] * updates[t] @ suffix(s).T
        out.append(emb)
    return out


def make(T=7, p=5, m=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = [int(torch.randint(1, 5, (1,), generator=g)) for _ in range(T)]
    grads = [torch.randn(b, p, generator=g, dtype=F64) for b in B]
    # a positive diagonal preconditioner per step, as Adam's 1/(√v̂+ε) is
    P = [0.5 + torch.rand(p, generator=g, dtype=F64) for _ in range(T)]
    updates = [gr * P[t] for t, gr in enumerate(grads)]
    curv = [torch.randn(m, p, generator=g, dtype=F64) for _ in range(T)]
    curv_updates = [c * P[t] for t, c in enumerate(curv)]
    etas = [0.02 + 0.05 * float(torch.rand(1, generator=g)) for _ in range(T)]
    decay = [1 - 0.01 * (1 + t % 3) for t in range(T)]
    return grads, updates, curv, curv_updates, etas, decay


def assert_all_close(got, ref):
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.dtype == F64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sampled", [False, True], ids=["empirical", "sampled"])
@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_every_segment_count_equals_the_explicit_formula(beta, sampled):
    grads, updates, curv, cu, etas, decay = make()
    T = len(grads)
    bs = [6] * T
    kw = dict(curvature=curv, curv_updates=cu, batch_sizes=bs) if sampled else {}
    ref = brute_force(grads, updates, etas, beta, decay, **kw)
    for segments in range(1, T + 1):
        got = dvemb_one_layer(
            grads, etas, segments=segments, updates=updates, momentum=beta, decay=decay,
            curvature=curv if sampled else None, curvature_updates=cu if sampled else None,
            batch_sizes=bs if sampled else None,
        )
        assert_all_close(got, ref)


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_without_updates_momentum_and_decay_act_on_the_raw_gradients(beta):
    grads, _, _, _, etas, decay = make(seed=2)
    ref = brute_force(grads, grads, etas, beta, decay)
    for segments in (1, 3, len(grads)):
        assert_all_close(dvemb_one_layer(grads, etas, segments=segments, momentum=beta, decay=decay), ref)


def test_defaults_are_sgd_bit_for_bit():
    grads, _, curv, _, etas, _ = make(seed=3)
    T = len(grads)
    for c in (None, curv):
        sgd = dvemb_one_layer(grads, etas, segments=3, curvature=c)
        same = dvemb_one_layer(grads, etas, segments=3, curvature=c, updates=None,
                               momentum=0.0, decay=[1.0] * T)
        assert all(torch.equal(a, b) for a, b in zip(sgd, same))
        # u = g through the AdamW arguments is SGD up to rounding
        via_updates = dvemb_one_layer(grads, etas, segments=3, curvature=c, updates=grads,
                                      curvature_updates=c)
        for a, b in zip(sgd, via_updates):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_layers_are_independent_with_momentum():
    T, layers = 6, {"a": 4, "b": 4, "c": 3}
    per_layer = {n: make(T=T, p=p, seed=10 + i) for i, (n, p) in enumerate(layers.items())}
    # the same batch size in every layer of a step
    for n in layers:
        g, u = per_layer[n][0], per_layer[n][1]
        per_layer[n] = ([x[:1] for x in g], [x[:1] for x in u]) + per_layer[n][2:]
    grads = [{n: per_layer[n][0][t] for n in layers} for t in range(T)]
    updates = [{n: per_layer[n][1][t] for n in layers} for t in range(T)]
    etas, decay = per_layer["a"][4], per_layer["a"][5]
    for segments in (1, 2, 3):
        got = data_value_embeddings(grads, etas, segments=segments, updates=updates, momentum=0.9, decay=decay)
        for n in layers:
            ref = brute_force([s[n] for s in grads], [s[n] for s in updates], etas, 0.9, decay)
            for t in range(T):
                torch.testing.assert_close(got[t][n], ref[t], rtol=1e-10, atol=1e-12)


def test_segment_recursion_carries_the_local_K_and_R():
    grads, updates, _, _, etas, decay = make(T=5, p=4, seed=4)
    beta, first = 0.9, 7  # a segment starting at global step 7
    rec = SegmentRecursion({W: 4}, dtype=F64, momentum=beta)
    for t in range(4, -1, -1):
        rec.step({W: grads[t]}, etas[t], step=first + t, updates={W: updates[t]}, decay=decay[t])
    Ks = step_jacobians(grads, updates, etas, decay)
    K = torch.eye(4, dtype=F64)
    R = torch.zeros(4, 4, dtype=F64)
    for t in range(5):  # R^loc_first = Σ_s β^s c_s eta_s K_{s+1→end}
        suffix = torch.eye(4, dtype=F64)
        for k in range(t + 1, 5):
            suffix = Ks[k] @ suffix
        R = R + beta ** t * momentum_weight(beta, first + t) * etas[t] * suffix
        K = Ks[t] @ K
    torch.testing.assert_close(rec.K[W], K)
    torch.testing.assert_close(rec.R[W], R)
    assert SegmentRecursion({W: 4}, momentum=0.0).R is None


def test_pipeline_style_segment_combine_and_finalise():
    """What the segment actors and the reducer do: local sweeps, one combine, per-step finalise."""
    grads, updates, curv, cu, etas, decay = make(T=8, seed=5)
    beta = 0.9
    ref = brute_force(grads, updates, etas, beta, decay, curvature=curv, curv_updates=cu)
    bounds = segment_bounds(len(grads), 3)
    segs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        local, rec = segment_embeddings(one_layer(grads[a:b]), etas[a:b], one_layer(curv[a:b]),
                                        updates=one_layer(updates[a:b]), curvature_updates=one_layer(cu[a:b]),
                                        momentum=beta, decay=decay[a:b], first_step=a)
        segs.append((a, b, local, rec.K, rec.R))
    suffixes, r_ends = segment_combine([s[3] for s in segs], [s[4] for s in segs],
                                       [b - a for a, b, *_ in segs], momentum=beta)
    assert torch.count_nonzero(r_ends[-1][W]) == 0
    for (a, b, local, _, _), S, r_end in zip(segs, suffixes, r_ends):
        for t in range(a, b):
            got = finalise_step(local[t - a], S, r_end, {W: updates[t]}, beta, steps_to_end=b - t)
            torch.testing.assert_close(got[W], ref[t], rtol=1e-10, atol=1e-12)


def test_float32_is_close_to_float64():
    grads, updates, _, _, etas, decay = make(seed=6)
    ref = brute_force(grads, updates, etas, 0.9, decay)
    got = dvemb_one_layer([g.float() for g in grads], etas, segments=3,
                          updates=[u.float() for u in updates], momentum=0.9, decay=decay)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_bad_input_is_a_clear_error():
    grads, updates, curv, cu, etas, decay = make(T=3, seed=7)
    with pytest.raises(ValueError, match="steps of updates"):
        dvemb_one_layer(grads, etas, updates=updates[:2])
    with pytest.raises(ValueError, match="steps of decay"):
        dvemb_one_layer(grads, etas, decay=decay[:2])
    with pytest.raises(ValueError, match="steps of curvature_updates"):
        dvemb_one_layer(grads, etas, curvature=curv, updates=updates, curvature_updates=cu[:1])
    with pytest.raises(ValueError, match="need curvature_updates"):
        dvemb_one_layer(grads, etas, curvature=curv, updates=updates)
    with pytest.raises(ValueError, match="only go with"):
        dvemb_one_layer(grads, etas, curvature=curv, curvature_updates=cu)
    for beta in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            dvemb_one_layer(grads, etas, momentum=beta)
    with pytest.raises(ValueError, match="update rows"):
        dvemb_one_layer(grads, etas, updates=[u[:0] for u in updates])
    rec = SegmentRecursion({W: 5}, dtype=F64, momentum=0.9)
    with pytest.raises(ValueError, match="step= .* is required"):
        rec.step({W: grads[0]}, 0.1)
    with pytest.raises(KeyError, match="updates missing"):
        rec.step({W: grads[0]}, 0.1, step=0, updates={})
    with pytest.raises(ValueError, match="one local R and one length"):
        segment_combine([{W: torch.eye(2)}], None, None, momentum=0.9)


# ----------------------------------------------------------------------------- v's response


def brute_force_v(grads, updates, v_rows, etas, beta1, beta2, decay, **curv):
    """The explicit formula with the second-moment response (docs/method.md §7):
    Σ_{s≥t} eta_s K_{s+1→} (w_{t,s} u - c_{t,s} y),  c_{t,s} = (1-β₂) β₂^(s-t) / (1-β₂^(s+1))."""
    T, p = len(grads), grads[0].shape[1]
    Ks = step_jacobians(grads, updates, etas, decay, **curv)
    out = []
    for t in range(T):
        emb = torch.zeros_like(updates[t])
        for s in range(t, T):
            S = torch.eye(p, dtype=F64)
            for k in range(s + 1, T):
                S = Ks[k] @ S
            w = (1 - beta1) * beta1 ** (s - t) / (1 - beta1 ** (s + 1))
            c = (1 - beta2) * beta2 ** (s - t) / (1 - beta2 ** (s + 1))
            emb = emb + etas[s] * (w * updates[t] - c * v_rows[t]) @ S.T
        out.append(emb)
    return out


@pytest.mark.parametrize("sampled", [False, True], ids=["empirical", "sampled"])
@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_second_moment_response_equals_the_explicit_formula_for_every_segment_count(beta1, sampled):
    grads, updates, curv, cu, etas, decay = make(seed=5)
    T = len(grads)
    g = torch.Generator().manual_seed(6)
    v_rows = [torch.randn(x.shape, generator=g, dtype=F64) for x in grads]
    bs = [6] * T
    kw = dict(curvature=curv, curv_updates=cu, batch_sizes=bs) if sampled else {}
    ref = brute_force_v(grads, updates, v_rows, etas, beta1, 0.95, decay, **kw)
    for segments in range(1, T + 1):
        got = dvemb_one_layer(
            grads, etas, segments=segments, updates=updates, momentum=beta1, decay=decay,
            curvature=curv if sampled else None, curvature_updates=cu if sampled else None,
            batch_sizes=bs if sampled else None, v_rows=v_rows, beta2=0.95,
        )
        assert_all_close(got, ref)


def test_second_moment_response_across_layers_and_its_bad_input():
    T = 5
    grads = [{"a": torch.randn(2, 3, dtype=F64), "b": torch.randn(2, 4, dtype=F64)} for _ in range(T)]
    v_rows = [{n: torch.randn_like(x) for n, x in g.items()} for g in grads]
    etas, decay = [0.05] * T, [0.99] * T
    got = data_value_embeddings(grads, etas, segments=2, momentum=0.9, decay=decay, v_rows=v_rows, beta2=0.9)
    for n in ("a", "b"):
        ref = brute_force_v([s[n] for s in grads], [s[n] for s in grads], [s[n] for s in v_rows],
                            etas, 0.9, 0.9, decay)
        for t in range(T):
            torch.testing.assert_close(got[t][n], ref[t], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="go together"):
        data_value_embeddings(grads, etas, v_rows=v_rows)
    with pytest.raises(ValueError, match="beta2"):
        data_value_embeddings(grads, etas, v_rows=v_rows, beta2=1.0)
    rec = SegmentRecursion({"a": 3, "b": 4}, dtype=F64, beta2=0.9)
    with pytest.raises(ValueError, match="v_rows"):
        rec.step(grads[-1], 0.05, step=T - 1)
    with pytest.raises(KeyError, match="'b'"):
        rec.step(grads[-1], 0.05, step=T - 1, v_rows={"a": v_rows[-1]["a"]})
