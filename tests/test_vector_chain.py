"""The vector chain (values from w_ℓ = S_ℓᵀ v, z_ℓ = R_bᵀ v; docs/method.md §4, §7) and the
parallel matrix scan across segments (suffix_scan of compose_links), against segment_combine
and brute-force float64 references: the values v·DVEmb(t, z) with every K product formed
explicitly, and the suffixes as blocks of explicit block-matrix products."""

import copy
import math

import pytest
import torch

from rayattr.math.dvemb import (
    carried_ends,
    chain_vectors_back,
    compose_links,
    finalise_scores,
    finalise_step,
    segment_bounds,
    segment_combine,
    segment_embeddings,
    scan_rounds,
    segment_link,
    suffix_scan,
    vector_chain,
)
from rayattr.embed.sums import SourcePhaseSums, chain_sums_forward
from tests.test_dvemb import W, one_layer
from tests.test_dvemb_adamw import brute_force

F64 = torch.float64


def make(T=9, p=5, seed=0, adamw=True):
    g = torch.Generator().manual_seed(seed)
    B = [int(torch.randint(1, 5, (1,), generator=g)) for _ in range(T)]
    grads = [torch.randn(b, p, generator=g, dtype=F64) for b in B]
    updates = [torch.randn(b, p, generator=g, dtype=F64) if adamw else x for b, x in zip(B, grads)]
    etas = (0.05 + 0.1 * torch.rand(T, generator=g, dtype=F64)).tolist()
    decay = (1 - 0.01 * torch.rand(T, generator=g, dtype=F64)).tolist() if adamw else [1.0] * T
    v = {W: torch.randn(p, generator=g, dtype=F64)}
    return grads, updates, etas, decay, v


def segments_of(grads, updates, etas, decay, beta, n):
    bounds = segment_bounds(len(grads), n)
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        e, rec = segment_embeddings(one_layer(grads[a:b]), etas[a:b], updates=one_layer(updates[a:b]),
                                    momentum=beta, decay=decay[a:b], first_step=a)
        out.append((a, b, e, rec.K, rec.R))
    return out


@pytest.mark.parametrize("beta", [0.0, 0.9])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_vector_chain_is_the_transposed_matrix_chain(beta, n):
    grads, updates, etas, decay, v = make(adamw=beta > 0)
    segs = segments_of(grads, updates, etas, decay, beta, n)
    Ks, Rs, lengths = [s[3] for s in segs], [s[4] for s in segs], [s[1] - s[0] for s in segs]
    suffixes, r_ends = segment_combine(Ks, Rs, lengths, beta)
    chain = vector_chain(Ks, v, Rs, lengths, beta)
    for ell, (w, z) in enumerate(chain):
        torch.testing.assert_close(w[W], suffixes[ell][W].T @ v[W], rtol=1e-12, atol=1e-14)
        if beta:
            torch.testing.assert_close(z[W], r_ends[ell][W].T @ v[W], rtol=1e-12, atol=1e-14)
        else:
            assert z is None and r_ends[ell] is None


@pytest.mark.parametrize("beta", [0.0, 0.9])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_values_from_vectors_equal_brute_force_and_the_matrix_path(beta, n):
    grads, updates, etas, decay, v = make(seed=n, adamw=beta > 0)
    want = torch.cat([e @ v[W] for e in brute_force(grads, updates, etas, beta, decay)])
    segs = segments_of(grads, updates, etas, decay, beta, n)
    Ks, Rs, lengths = [s[3] for s in segs], [s[4] for s in segs], [s[1] - s[0] for s in segs]
    suffixes, r_ends = segment_combine(Ks, Rs, lengths, beta)
    chain = vector_chain(Ks, v, Rs, lengths, beta)
    got, via_matrix = [], []
    for (a, b, e, _, _), (w, z), S, r_end in zip(segs, chain, suffixes, r_ends):
        for t, local in zip(range(a, b), e):
            got.append(finalise_scores(local, w, z, {W: updates[t]}, beta, b - t)[W])
            via_matrix.append(finalise_step(local, S, r_end, {W: updates[t]}, beta, b - t)[W] @ v[W])
    got, via_matrix = torch.cat(got), torch.cat(via_matrix)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(got, via_matrix, rtol=1e-12, atol=1e-14)
    assert got.abs().max() > 1e-3  # the values are not trivially zero


@pytest.mark.parametrize("width", [None, 1, 2, 3, 5])
def test_suffix_scan_schedule(width):
    """suffix_scan on a non-commutative operation (string concatenation, later on the left):
    item i is items[n-1] ⋯ items[i]. With a device per item (width None) the combines' longest
    dependency chain is ⌈log2 n⌉ (Hillis–Steele); at width w < n about 2n combines, within
    scan_rounds; at width 1 the sequential chain's n - 1."""
    for n in range(0, 18):
        calls = []

        def concat(i, later, own):
            calls.append(i)
            return later[0] + own[0], max(later[1], own[1]) + 1  # (product, dependency depth)

        got = suffix_scan([(chr(97 + i), 0) for i in range(n)], concat, width)
        assert [x[0] for x in got] == ["".join(chr(97 + j) for j in range(n - 1, i - 1, -1)) for i in range(n)]
        depth = max((x[1] for x in got), default=0)
        w = n if width is None else min(width, n)
        if w == n:
            assert depth == scan_rounds(n, width) == (math.ceil(math.log2(n)) if n > 1 else 0)
        else:
            assert depth <= scan_rounds(n, width)
            assert len(calls) <= 2 * n + w * math.ceil(math.log2(w))
        if w == 1:
            assert len(calls) == scan_rounds(n, 1) == max(0, n - 1)


def block_products(Ks, Rs, lengths, beta):
    """Brute force: (S_ℓ, R_{b_ℓ}) as blocks of the explicit 2p × 2p product M_{n-1} ⋯ M_{ℓ+1},
    M_ℓ = [[K_ℓ, R^loc_ℓ], [0, β^(b_ℓ - a_ℓ) I]], per layer."""
    out = []
    for ell in range(len(Ks)):
        S, R = {}, {}
        for name, K in Ks[0].items():
            p = K.shape[0]
            prod = torch.eye(2 * p, dtype=F64)
            for m in range(len(Ks) - 1, ell, -1):
                M = torch.zeros(2 * p, 2 * p, dtype=F64)
                M[:p, :p] = Ks[m][name]
                M[:p, p:] = Rs[m][name] if beta else 0
                M[p:, p:] = beta ** lengths[m] * torch.eye(p, dtype=F64)
                prod = prod @ M
            S[name], R[name] = prod[:p, :p], prod[:p, p:]
        out.append((S, R))
    return out


def random_segments(n, beta, seed=0):
    """n segments' K and local R for two layers of different widths, and their lengths."""
    g = torch.Generator().manual_seed(seed)
    dims = {"a": 5, "b": 3}
    Ks = [{k: torch.eye(p, dtype=F64) + 0.3 * torch.randn(p, p, generator=g, dtype=F64) for k, p in dims.items()}
          for _ in range(n)]
    Rs = [{k: 0.5 * torch.randn(p, p, generator=g, dtype=F64) for k, p in dims.items()} for _ in range(n)]
    lengths = [int(x) for x in torch.randint(1, 6, (n,), generator=g)]
    return Ks, (Rs if beta else None), lengths


def scanned(Ks, Rs, lengths, beta, width=None):
    """(S_ℓ, R_{b_ℓ}) as the pipeline gets them: suffix_scan of segments 1..n-1's links with
    compose_links (each combine on its own copy: nothing is shared between actors)."""
    own = [segment_link(K, R, length, beta) for K, R, length in
           zip(Ks[1:], Rs[1:] if Rs else [None] * len(Ks), lengths[1:])]
    links = suffix_scan(own, lambda i, later, mine: compose_links(*copy.deepcopy((later, mine))), width) + [None]
    return links


@pytest.mark.parametrize("width", [None, 2, 3])
@pytest.mark.parametrize("beta", [0.0, 0.9])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_suffix_scan_equals_segment_combine_and_block_products(beta, n, width):
    """The parallel scan's links (a device per actor, or blocks on fewer) equal the in-memory
    sequential chain (segment_combine) and the explicit block-matrix products, to float64
    rounding."""
    Ks, Rs, lengths = random_segments(n, beta, seed=n)
    links = scanned(Ks, Rs, lengths, beta, width)
    suffixes, r_ends = segment_combine(Ks, Rs, lengths, beta)
    want = block_products(Ks, Rs, lengths, beta)
    assert links[-1] is None and len(links) == n
    for ell, link in enumerate(links):
        S = link.S if link is not None else {k: torch.eye(K.shape[0], dtype=F64) for k, K in Ks[0].items()}
        for name in Ks[0]:
            torch.testing.assert_close(S[name], want[ell][0][name], rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(suffixes[ell][name], want[ell][0][name], rtol=1e-12, atol=1e-13)
            if beta:
                R = link.R[name] if link is not None else torch.zeros_like(S[name])
                torch.testing.assert_close(R, want[ell][1][name], rtol=1e-12, atol=1e-13)
                torch.testing.assert_close(r_ends[ell][name], want[ell][1][name], rtol=1e-12, atol=1e-13)
                if link is not None:
                    assert link.carry == pytest.approx(beta ** sum(lengths[ell + 1:]), rel=1e-14)
            else:
                assert r_ends[ell] is None and (link is None or link.R is None)
    if n > 1:  # the products are not near the identity
        assert all(float((S - torch.eye(S.shape[0], dtype=F64)).abs().max()) > 0.3 for S in suffixes[0].values())


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_suffix_scan_of_real_segments_equals_segment_combine(beta):
    """The same on segments swept from recorded-like steps (segment_embeddings' K and R)."""
    grads, updates, etas, decay, _ = make(T=11, adamw=beta > 0)
    segs = segments_of(grads, updates, etas, decay, beta, 5)
    Ks = [{"a": s[3][W], "b": 2 * s[3][W]} for s in segs]
    Rs = [{"a": s[4][W], "b": 2 * s[4][W]} for s in segs] if beta else None
    lengths = [s[1] - s[0] for s in segs]
    suffixes, r_ends = segment_combine(Ks, Rs, lengths, beta)
    for ell, link in enumerate(scanned(Ks, Rs, lengths, beta)[:-1]):
        for n in ("a", "b"):
            torch.testing.assert_close(link.S[n], suffixes[ell][n], rtol=1e-12, atol=1e-14)
            if beta:
                torch.testing.assert_close(link.R[n], r_ends[ell][n], rtol=1e-12, atol=1e-14)
        assert (link.R is None) == (not beta)


@pytest.mark.parametrize("width", [None, 2])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_suffix_scan_carries_q_as_the_sequential_chain_does(n, width):
    """v's response: Q rides in each link beside R with β₂ for β₁, and the scan's Q at every
    segment's end equals carried_ends, the sequential chain's, to float64 rounding."""
    Ks, Rs, lengths = random_segments(n, 0.9, seed=10 + n)
    _, Qs, _ = random_segments(n, 0.9, seed=20 + n)
    beta2 = 0.95
    own = [segment_link(K, R, length, 0.9, Q_loc=Q, beta2=beta2)
           for K, R, Q, length in zip(Ks[1:], Rs[1:], Qs[1:], lengths[1:])]
    links = suffix_scan(own, lambda i, later, mine: compose_links(*copy.deepcopy((later, mine))), width) + [None]
    suffixes, _ = segment_combine(Ks, Rs, lengths, 0.9)
    q_ends = carried_ends(suffixes, Qs, lengths, beta2)
    for ell, link in enumerate(links[:-1]):
        for name in Ks[0]:
            torch.testing.assert_close(link.Q[name], q_ends[ell][name], rtol=1e-12, atol=1e-13)
        assert link.carry_q == pytest.approx(beta2 ** sum(lengths[ell + 1:]), rel=1e-14)
    assert all(float(q.abs().max()) > 0 for q in q_ends[0].values())
    with pytest.raises(ValueError, match="both links carry Q"):
        compose_links(own[0], segment_link(Ks[0], Rs[0], lengths[0], 0.9))


def test_compose_links_refuses_mixed_momentum():
    K = {W: torch.eye(2, dtype=F64)}
    with pytest.raises(ValueError, match="both links carry R"):
        compose_links(segment_link(K, K, 2, 0.5), segment_link(K))


def test_a_vector_link_is_o_p2_and_needs_z_only_with_momentum():
    K = {W: torch.randn(4, 4, dtype=F64)}
    w = {W: torch.randn(4, dtype=F64)}
    w_prev, z_prev = chain_vectors_back(K, w)
    torch.testing.assert_close(w_prev[W], K[W].T @ w[W])
    assert z_prev is None
    R = {W: torch.randn(4, 4, dtype=F64)}
    _, z_prev = chain_vectors_back(K, w, R, None, 3, 0.5)
    torch.testing.assert_close(z_prev[W], R[W].T @ w[W])
    with pytest.raises(ValueError, match="update rows"):
        finalise_scores({W: torch.ones(2, 4, dtype=F64)}, w, z_prev, None, 0.5, None)


def sums_of(rows):
    """(3, p) rows as the per-(source, phase) sums of three keys, one row each."""
    out = SourcePhaseSums({W: rows.shape[1]})
    for i, row in enumerate(rows):
        out.add([f"s{i}"], 0, {W: row[None]})
    return out


@pytest.mark.parametrize("beta", [0.0, 0.9])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_forward_sum_scan_equals_suffix_products(beta, n):
    """Sums finalised by the forward scan the segment actors run (no suffix matrix anywhere)
    equal Σ_ℓ S_ℓ x_ℓ + R_{b_ℓ} c_ℓ from segment_combine, for 3 keys at once."""
    grads, updates, etas, decay, _ = make(T=10, seed=7, adamw=beta > 0)
    segs = segments_of(grads, updates, etas, decay, beta, n)
    Ks, Rs, lengths = [s[3] for s in segs], [s[4] for s in segs], [s[1] - s[0] for s in segs]
    suffixes, r_ends = segment_combine(Ks, Rs, lengths, beta)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(3, 5, generator=g, dtype=F64) for _ in segs]
    cs = [torch.randn(3, 5, generator=g, dtype=F64) for _ in segs]
    want = sum(x @ S[W].T + (c @ r[W].T if beta else 0) for x, c, S, r in zip(xs, cs, suffixes, r_ends))
    link = None
    for ell in range(len(segs)):
        link = chain_sums_forward(Ks[ell], sums_of(xs[ell]), link, Rs[ell] if beta else None,
                                  sums_of(cs[ell]) if beta else None, lengths[ell], beta)
    y, d = link
    torch.testing.assert_close(torch.stack([y.sum[(f"s{i}", 0)][W] for i in range(3)]), want,
                               rtol=1e-12, atol=1e-13)
    assert y.count == {(f"s{i}", 0): n for i in range(3)}  # each segment's one occurrence per key
    assert (d is None) == (not beta)
