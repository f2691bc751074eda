"""The curvature through the momentum (docs/method.md §7, `embed.momentum_curvature`) against
a brute-force forward simulation of the linearised AdamW run, in float64.

The linearised run moves a perturbation δ of the weights as the recursion assumes (P frozen
at each occurrence's step, κ in u): the gradient change at step r, Σ_i g_i ⟨g_i, δ_r⟩ (or the
sampled rows' (B/m) Σ ĝ ⟨ĝ, δ_r⟩), enters the momentum and is spent at every later step s
with weight w_{r,s} = (1-β₁) β₁^(s-r) / (1-β₁^(s+1)):

    δ_{s+1} = α_s δ_s − η_s Σ_{r≤s} w_{r,s} Σ_i u_{r,i} ⟨g_{r,i}, δ_r⟩ + [s ≥ t] w_{t,s} η_s u_z

and DVEmb(t, z) = δ_T from δ = 0. O(T²) matrix-vector products per occurrence, no K formed."""

import pytest
import torch

from rayattr.math.dvemb import (
    SegmentRecursion,
    compose_links,
    data_value_embeddings,
    finalise_scores,
    finalise_step,
    segment_bounds,
    segment_combine,
    segment_embeddings,
    segment_link,
    vector_chain,
)
from tests.test_dvemb import W, dvemb_one_layer, one_layer
from tests.test_dvemb_adamw import brute_force as momentum_free, make

F64 = torch.float64


def forward_simulation(grads, updates, etas, beta, decay, curvature=None, curv_updates=None, batch_sizes=None):
    """DVEmb of every occurrence by simulating the linearised run forward (module docstring)."""
    T = len(grads)

    def response(r, x):  # the gradient change at step r to weights δ_r = x, as P spends it: Σ u ⟨g, x⟩
        if curvature is None:
            return updates[r].T @ (grads[r] @ x)
        B = batch_sizes[r] if batch_sizes is not None else grads[r].shape[0]
        return B / curvature[r].shape[0] * curv_updates[r].T @ (curvature[r] @ x)

    def w(r, s):
        return (1 - beta) * beta ** (s - r) / (1 - beta ** (s + 1))

    out = []
    for t in range(T):
        rows = []
        for z in range(grads[t].shape[0]):
            delta = [torch.zeros(grads[0].shape[1], dtype=F64) for _ in range(T + 1)]
            for s in range(t, T):
                move = decay[s] * delta[s] + w(t, s) * etas[s] * updates[t][z]
                for r in range(t + 1, s + 1):  # δ_r = 0 up to t: no earlier step responds
                    move = move - etas[s] * w(r, s) * response(r, delta[r])
                delta[s + 1] = move
            rows.append(delta[T])
        out.append(torch.stack(rows))
    return out


def assert_all_close(got, ref):
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sampled", [False, True], ids=["empirical", "sampled"])
def test_every_segment_count_equals_the_forward_simulation(sampled):
    grads, updates, curv, cu, etas, decay = make(T=7, seed=11)
    etas = [5 * e for e in etas]  # steps long enough that the two K's differ visibly
    T, beta = len(grads), 0.9
    bs = [6] * T
    kw = dict(curvature=curv, curv_updates=cu, batch_sizes=bs) if sampled else {}
    ref = forward_simulation(grads, updates, etas, beta, decay, **kw)
    free = momentum_free(grads, updates, etas, beta, decay, **kw)
    gap = max(float((a - b).abs().max()) for a, b in zip(ref, free))
    assert gap > 1e-3 * max(float(a.abs().max()) for a in ref), "the test cannot tell the two K's apart"
    for segments in range(1, T + 1):
        got = dvemb_one_layer(grads, etas, segments=segments, updates=updates, momentum=beta, decay=decay,
                              curvature=curv if sampled else None, curvature_updates=cu if sampled else None,
                              batch_sizes=bs if sampled else None, momentum_curvature=True)
        assert_all_close(got, ref)


def test_layers_stay_independent_and_their_widths_may_differ():
    gen = torch.Generator().manual_seed(21)
    base, _, _, _, etas, decay = make(T=6, p=4, seed=20)
    rows = [g.shape[0] for g in base]  # one step's rows share B across layers
    layers = {"a": 4, "b": 4, "c": 3}  # a and b are stacked into one batched matmul
    grads = [{n: torch.randn(b, p, generator=gen, dtype=F64) for n, p in layers.items()} for b in rows]
    updates = [{n: g * (0.5 + torch.rand(g.shape[1], generator=gen, dtype=F64)) for n, g in gs.items()}
               for gs in grads]
    got = data_value_embeddings(grads, [4 * e for e in etas], segments=3, updates=updates, momentum=0.9,
                                decay=decay, momentum_curvature=True)
    for n in layers:
        ref = forward_simulation([g[n] for g in grads], [u[n] for u in updates], [4 * e for e in etas], 0.9, decay)
        assert_all_close([e[n] for e in got], ref)


def test_without_momentum_it_is_the_momentum_free_recursion():
    grads, updates, _, _, etas, decay = make(seed=12)
    a = dvemb_one_layer(grads, etas, segments=3, updates=updates, momentum=0.0, decay=decay)
    b = dvemb_one_layer(grads, etas, segments=3, updates=updates, momentum=0.0, decay=decay,
                        momentum_curvature=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert SegmentRecursion({W: 5}, momentum=0.0, momentum_curvature=True).D is None


def test_the_momentum_free_carried_rows_are_the_lower_rows_of_its_link():
    """SegmentRecursion.carried is β₁^(b-t) u without the curvature through the momentum, and
    the sweep from [0, I] gives D^loc u with it: at the last step fed the two agree, since the
    first step of a sweep has no curvature behind it."""
    grads, updates, _, _, etas, decay = make(T=4, seed=13)
    free = SegmentRecursion({W: 5}, dtype=F64, momentum=0.9)
    full = SegmentRecursion({W: 5}, dtype=F64, momentum=0.9, momentum_curvature=True)
    for k, t in enumerate(range(3, -1, -1)):
        for rec in (free, full):
            rec.step({W: grads[t]}, etas[t], step=t, updates={W: updates[t]}, decay=decay[t])
        torch.testing.assert_close(free.carried[W], 0.9 ** (k + 1) * updates[t])
        if k == 0:
            torch.testing.assert_close(full.carried[W], free.carried[W])
    assert float((full.carried[W] - free.carried[W]).abs().max()) > 1e-6  # later, C ≠ 0 turns it
    assert SegmentRecursion({W: 5}, momentum=0.0).carried is None


def test_pipeline_style_links_scan_vectors_and_finalise():
    """What the segment actors and the reducer do under momentum_curvature: local sweeps with
    their C, D and carried rows, the scan of full links, the vector chain and both finalisations."""
    grads, updates, curv, cu, etas, decay = make(T=9, seed=14)
    etas = [4 * e for e in etas]
    beta = 0.9
    ref = forward_simulation(grads, updates, etas, beta, decay, curvature=curv, curv_updates=cu)
    bounds = segment_bounds(len(grads), 3)
    segs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        carried: list = []
        local, rec = segment_embeddings(one_layer(grads[a:b]), etas[a:b], one_layer(curv[a:b]),
                                        updates=one_layer(updates[a:b]), curvature_updates=one_layer(cu[a:b]),
                                        momentum=beta, decay=decay[a:b], first_step=a, momentum_curvature=True,
                                        carried=carried)
        segs.append((a, b, local, carried, rec))
    Ks, Rs, Cs, Ds = ([getattr(s[4], x) for s in segs] for x in "KRCD")
    lengths = [b - a for a, b, *_ in segs]
    suffixes, r_ends = segment_combine(Ks, Rs, lengths, beta, Cs, Ds)
    # the scan's combine is associative on full links too
    links = [segment_link(Ks[i], Rs[i], lengths[i], beta, C_loc=Cs[i], D_loc=Ds[i]) for i in range(3)]
    left, right = compose_links(compose_links(links[2], links[1]), links[0]), compose_links(
        links[2], compose_links(links[1], links[0]))
    for x, y in ((left.S, right.S), (left.R, right.R), (left.C, right.C), (left.D, right.D)):
        torch.testing.assert_close(x[W], y[W], rtol=1e-10, atol=1e-12)
    v = {W: torch.randn(5, dtype=F64, generator=torch.Generator().manual_seed(3))}
    chain = vector_chain(Ks, v, Rs, lengths, beta, Cs, Ds)
    for (a, b, local, carried, _), S, r_end, (w, z) in zip(segs, suffixes, r_ends, chain):
        for t in range(a, b):
            got = finalise_step(local[t - a], S, r_end, {W: updates[t]}, beta, b - t, carried=carried[t - a])
            torch.testing.assert_close(got[W], ref[t], rtol=1e-9, atol=1e-12)
            score = finalise_scores(local[t - a], w, z, {W: updates[t]}, beta, b - t, carried=carried[t - a])
            torch.testing.assert_close(score[W], ref[t] @ v[W], rtol=1e-9, atol=1e-12)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="not combined with v's response"):
        SegmentRecursion({W: 3}, momentum=0.9, beta2=0.99, momentum_curvature=True)
    K = {W: torch.eye(3, dtype=F64)}
    full = segment_link(K, K, 2, 0.9, C_loc=K, D_loc=K)
    free = segment_link(K, K, 2, 0.9)
    with pytest.raises(ValueError, match="full lower row"):
        compose_links(full, free)
