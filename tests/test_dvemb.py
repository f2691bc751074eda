"""The DVEmb recursion against the explicit product formula, in float64."""

import pytest
import torch

from rayattr.math.dvemb import (
    SegmentRecursion,
    data_value_embeddings,
    influence,
    segment_bounds,
)

W = "w"  # the one layer of the single-layer tests


def one_layer(steps):
    """A list of per-step tensors as the per-step layer dicts the recursion takes (None stays None)."""
    return [{W: x} for x in steps] if steps is not None else None


def dvemb_one_layer(grads, etas, **kw):
    """data_value_embeddings of one layer: every per-step sequence of tensors as layer dicts,
    the result back as tensors."""
    per_step = ("curvature", "updates", "curvature_updates", "v_rows")
    kw = {k: one_layer(v) if k in per_step else v for k, v in kw.items()}
    return [e[W] for e in data_value_embeddings(one_layer(grads), etas, **kw)]


def brute_force(grads, etas, curvature=None):
    """DVEmb(t, z) = eta_t Π_{k=t+1}^{T-1} (I - eta_k H_k) g_z, products formed explicitly."""
    T, p = len(grads), grads[0].shape[1]
    H = []
    for t in range(T):
        if curvature is None:
            H.append(grads[t].T @ grads[t])
        else:
            c = curvature[t]
            H.append(grads[t].shape[0] / c.shape[0] * c.T @ c)
    out = []
    for t in range(T):
        P = torch.eye(p, dtype=torch.float64)
        for k in range(t + 1, T):
            P = (torch.eye(p, dtype=torch.float64) - etas[k] * H[k]) @ P
        out.append(etas[t] * grads[t] @ P.T)
    return out


def make(T=7, p=5, seed=0, m=3):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(int(torch.randint(1, 5, (1,), generator=g)), p, generator=g, dtype=torch.float64) for _ in range(T)]
    etas = [0.05 + 0.1 * float(torch.rand(1, generator=g)) for _ in range(T)]
    curv = [torch.randn(m, p, generator=g, dtype=torch.float64) for _ in range(T)]
    return grads, etas, curv


@pytest.mark.parametrize("use_curvature", [False, True])
def test_all_segment_counts_match_explicit_products(use_curvature):
    grads, etas, curv = make()
    c = curv if use_curvature else None
    ref = brute_force(grads, etas, c)
    for segments in range(1, len(grads) + 1):
        got = dvemb_one_layer(grads, etas, segments=segments, curvature=c)
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            assert a.dtype == torch.float64
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_zero_step_size_update_has_no_influence_under_sgd():
    """A warm-up schedule's lr 0 steps (tests/test_pipeline.py records them end to end under
    AdamW, whose momentum carries them on): under SGD their occurrences' embeddings are 0."""
    grads, etas, _ = make()
    etas = [0.0, 0.0, *etas[2:]]
    got = dvemb_one_layer(grads, etas, segments=3)
    assert all(bool((e == 0).all()) for e in got[:2]) and all(bool((e != 0).any()) for e in got[2:])


@pytest.mark.parametrize("use_curvature", [False, True])
def test_layers_are_independent_and_batched(use_curvature):
    # three layers, two sharing a width (stacked path) and one on its own
    T = 6
    layers = {"a": 4, "b": 4, "c": 3}
    g = torch.Generator().manual_seed(1)
    B = [2, 3, 1, 4, 2, 3]
    grads = [{n: torch.randn(B[t], p, generator=g, dtype=torch.float64) for n, p in layers.items()} for t in range(T)]
    curv = [{n: torch.randn(2, p, generator=g, dtype=torch.float64) for n, p in layers.items()} for t in range(T)]
    etas = [0.1] * T
    c = curv if use_curvature else None
    for segments in (1, 2, 3):
        got = data_value_embeddings(grads, etas, segments=segments, curvature=c)
        for n in layers:
            ref = brute_force([s[n] for s in grads], etas, [s[n] for s in curv] if use_curvature else None)
            for t in range(T):
                torch.testing.assert_close(got[t][n], ref[t], rtol=1e-10, atol=1e-12)


def test_segment_matrix_is_product_and_equals_identity_minus_M():
    grads, etas, _ = make(T=4, p=3)
    rec = SegmentRecursion({"w": 3}, dtype=torch.float64)
    M = torch.zeros(3, 3, dtype=torch.float64)
    for t in range(3, -1, -1):
        e = rec.step({"w": grads[t]}, etas[t], step=t)["w"]
        # the paper's M form: DVEmb = eta g - eta M g, M += Σ DVEmb gᵀ
        torch.testing.assert_close(e, etas[t] * (grads[t] - grads[t] @ M.T))
        M = M + e.T @ grads[t]
    K = torch.eye(3, dtype=torch.float64)
    for t in range(4):
        K = (torch.eye(3, dtype=torch.float64) - etas[t] * grads[t].T @ grads[t]) @ K
    torch.testing.assert_close(rec.K["w"], K)
    torch.testing.assert_close(rec.K["w"], torch.eye(3, dtype=torch.float64) - M)


def test_steps_must_decrease_and_shapes_are_checked():
    rec = SegmentRecursion({"w": 3}, dtype=torch.float64)
    rec.step({"w": torch.ones(1, 3, dtype=torch.float64)}, 0.1, step=5)
    with pytest.raises(ValueError, match="decreasing"):
        rec.step({"w": torch.ones(1, 3, dtype=torch.float64)}, 0.1, step=5)
    with pytest.raises(ValueError, match="width 3"):
        rec.step({"w": torch.ones(1, 4, dtype=torch.float64)}, 0.1)
    with pytest.raises(KeyError, match="missing"):
        rec.step({}, 0.1)
    with pytest.raises(ValueError, match="step sizes"):
        data_value_embeddings([{W: torch.ones(1, 2)}], [0.1, 0.2])


def test_float32_stays_float32_and_close_to_float64():
    grads, etas, _ = make(T=5, p=4)
    got = dvemb_one_layer([g.float() for g in grads], etas, segments=2)
    ref = brute_force(grads, etas)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_influence_sums_layers():
    grads, etas, _ = make(T=4, p=3)
    emb = data_value_embeddings(one_layer(grads), etas)
    test = torch.randn(2, 3, dtype=torch.float64)
    scores = influence(emb, {W: test})
    for e, s in zip(emb, scores):
        torch.testing.assert_close(s, e[W] @ test.T)
    # dict layers are summed
    d = influence({"a": emb[0][W], "b": 2 * emb[0][W]}, {"a": test, "b": test})
    torch.testing.assert_close(d, 3 * emb[0][W] @ test.T)
    with pytest.raises(KeyError, match="missing"):
        influence(emb[0], {"a": test})


def test_segment_bounds_cover_range():
    assert segment_bounds(10, 3) == [0, 3, 7, 10]
    assert segment_bounds(2, 5) == [0, 1, 2]
    with pytest.raises(ValueError):
        segment_bounds(4, 0)
