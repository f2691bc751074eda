"""The exact AdamW reference (bench/exact_adamw.py) against what it must equal.

On a real recorded AdamW run (DeepSpeed ranks under Ray, clipping active):
- the float64 replay reproduces every step's clip factor κ the ranks recorded;
- (its metagradient is the product's, `rayattr exact`: tests/test_exact.py checks it against
  float64 retrains, and tests/test_pipeline_adamw.py on an AdamW run with momentum);
- without momentum (β₁ = 0), the adjoint sweep rayattr's recursion runs, with exact
  Hessian-vector products and κ, v held, is the exact linearisation of that run: it equals the
  metagradient with κ and v held, occurrence by occurrence.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from exact_adamw import AdamWReplay, adjoint_values  # noqa: E402

from rayattr.store import Run  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adamw_run(local_ray, tmp_path_factory):
    """A tiny AdamW run without momentum (β₁ = 0), its gradients clipped at every step, trained
    in this process on the session's Ray (no job process and Ray of its own to start)."""
    from rayattr.config import Config
    from rayattr.pipeline.stages import run_pipeline

    cfg = Config.from_dict({
        "run_id": "r",
        "data": {"seq_len": 16, "builtin": {"n_train": 48, "n_validation": 16, "max_chars": 96}},
        "model": {"n_layer": 1, "n_embd": 16, "n_head": 2},
        "train": {"micro_batch": 4, "epochs": 1, "lr": 0.01,
                  "optimizer": {"type": "adamw", "betas": [0.0, 0.95], "eps": 1e-8, "weight_decay": 0.1},
                  "deepspeed": {"zero_optimization": {"stage": 1}, "gradient_clipping": 0.5}},
        "capture": {"rank": 4},
        "embed": {"phases": 2, "segments": 1},
        "store": {"uri": str(tmp_path_factory.mktemp("exact-adamw") / "store")},
    }).validate()
    result = run_pipeline(cfg, progress=False)
    torch.set_num_threads(1)
    return AdamWReplay(Run.open_uri(result.uri))


def test_replay_reproduces_the_recorded_clip_factors(adamw_run):
    rp = adamw_run
    trace: list = []
    rp.unroll(torch.ones(rp.num_steps, rp.batch(0)[1].shape[0], dtype=torch.float64), trace=trace)
    kappas = np.array([k for _, _, k in trace])
    recorded = np.array([r.clip for r in rp.records])
    assert (recorded < 1).all(), "the run should clip at every step, or κ is not exercised"
    np.testing.assert_allclose(kappas, recorded, rtol=1e-5)


def test_adjoint_sweep_is_the_exact_linearisation_without_momentum(adamw_run):
    rp = adamw_run
    held, _ = rp.exact_values(frozenset({"kappa", "v"}))
    sweep = adjoint_values(rp, curvature="hessian")
    assert np.abs(held).max() > 0
    np.testing.assert_allclose(sweep, held, rtol=1e-6, atol=1e-9 * np.abs(held).max())
    # a different curvature is a different answer: the comparison can fail
    fisher = adjoint_values(rp, curvature="fisher")
    assert not np.allclose(fisher, held, rtol=1e-3)


def test_the_gradients_span_hessian_is_the_hessian_compressed_onto_that_span(adamw_run):
    """Q Qᵀ H Q Qᵀ x against exact Hessian-vector products: on the span of the step's per-sample
    gradients it is Q Qᵀ H x; orthogonal to it, zero."""
    from exact_adamw import subspace_hessian_product

    rp = adamw_run
    b, _ = rp.batch(2)
    p = {n: x.clone().requires_grad_(True) for n, x in rp.initial.items()}
    per = rp.per_sample(p, b)
    rows = [torch.autograd.grad(per[i], list(p.values()), retain_graph=True) for i in range(per.shape[0])]
    flat = lambda d: torch.cat([t.reshape(-1) for t in (d.values() if isinstance(d, dict) else d)])  # noqa: E731
    G = torch.stack([flat(g) for g in rows])
    Q, _ = torch.linalg.qr(G.T)
    gbar = torch.autograd.grad(per.mean(), list(p.values()), create_graph=True)

    def exact_hv(v):
        parts = v.split([x.numel() for x in p.values()])
        hv = torch.autograd.grad(gbar, list(p.values()), grad_outputs=[c.reshape(x.shape) for c, x in zip(parts, p.values())],
                                 retain_graph=True)
        return flat(hv)

    def as_dict(v):
        return {n: c.reshape(x.shape) for (n, x), c in zip(p.items(), v.split([x.numel() for x in p.values()]))}

    rng = torch.Generator().manual_seed(0)
    inside = G.T @ torch.randn(G.shape[0], dtype=G.dtype, generator=rng)
    want = Q @ (Q.T @ exact_hv(inside))
    got = flat(subspace_hessian_product(p, per, rows, as_dict(inside)))
    assert want.norm() > 0
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12 * float(want.norm()))
    outside = torch.randn(G.shape[1], dtype=G.dtype, generator=rng)
    outside -= Q @ (Q.T @ outside)
    assert flat(subspace_hessian_product(p, per, rows, as_dict(outside))).norm() < 1e-10 * want.norm()


def test_the_bench_prints_one_ablation_table(adamw_run, capsys):
    from exact_adamw import main

    main([adamw_run.run.uri, "--check", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    names = [r.split("|")[1].strip() for r in rows[1:]]
    assert names[:4] == ["exact", "κ held", "v held", "κ, v held"] and "rayattr values" in names
    assert "recursion, empirical Fisher" in names and "check " in out



def test_top_pairs_and_block_products_against_independent_references(adamw_run):
    """The top-k eigenpairs of P^½ H P^½ (bench/exact_adamw.py's "top" curvature) against
    ARPACK's Lanczos on the same Hessian-vector products, each pair against H P h = λ h; the
    low-rank product against Σ λ h hᵀ x formed densely; the per-layer ("blocks") product
    against a dense symmetric matrix's block-diagonal part."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    from exact_adamw import block_product, low_rank_product, top_pairs

    rp = adamw_run
    b, _ = rp.batch(1)
    p = {n: x.clone().requires_grad_(True) for n, x in rp.initial.items()}
    names, sizes = list(p), [x.numel() for x in p.values()]
    n = sum(sizes)
    flat = lambda d: torch.cat([d[k].reshape(-1) for k in names])  # noqa: E731
    as_dict = lambda v: {k: c.reshape(p[k].shape) for k, c in zip(names, v.split(sizes))}  # noqa: E731
    gbar = torch.autograd.grad(rp.per_sample(p, b).mean(), list(p.values()), create_graph=True)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        d = as_dict(v)
        return flat(dict(zip(names, torch.autograd.grad(gbar, list(p.values()), grad_outputs=[d[k] for k in names],
                                                        retain_graph=True))))

    gen = torch.Generator().manual_seed(1)
    P = as_dict(torch.rand(n, dtype=torch.float64, generator=gen) + 0.5)  # a positive diagonal
    half = flat(P).sqrt()
    S = LinearOperator((n, n), dtype=np.float64,
                       matvec=lambda v: (half * hvp(half * torch.from_numpy(np.ravel(v)))).numpy())
    lam = torch.from_numpy(eigsh(S, k=3, which="LM", return_eigenvectors=False, tol=1e-12))
    want = lam[lam.abs().argsort(descending=True)]

    k, state = 3, ({k: x.detach() for k, x in p.items()}, P, 1.0)
    got, rows, basis = top_pairs(rp, state, 1, k, iterations=100)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)
    for lj, h in zip(got, rows):  # h = P^-½ v for S v = λ v: H P h = λ h
        hv = flat(h)
        torch.testing.assert_close(hvp(flat(P) * hv), lj * hv, rtol=1e-4, atol=1e-6 * abs(float(lj)) * float(hv.norm()))
    # warm-started from its own basis it stays put
    again, _, _ = top_pairs(rp, state, 1, k, start=basis)
    torch.testing.assert_close(again, got, rtol=1e-8, atol=0.0)

    x = torch.randn(n, dtype=torch.float64, generator=gen)
    V = torch.stack([flat(h) for h in rows], 1)
    torch.testing.assert_close(flat(low_rank_product((got, rows), as_dict(x), blocks=False)), V @ (got * (V.T @ x)))

    # per layer: each weight matrix's own block, the vectors (biases, norms) together
    A = torch.randn(n, n, dtype=torch.float64, generator=gen)
    A = A + A.T
    groups = [[k] for k in names if p[k].dim() == 2] + [[k for k in names if p[k].dim() < 2]]
    offsets = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist()))
    mask = torch.zeros_like(A, dtype=torch.bool)
    for g in groups:
        idx = torch.cat([torch.arange(offsets[k], offsets[k] + p[k].numel()) for k in g])
        mask[idx[:, None], idx[None, :]] = True
    assert 0 < int(mask.sum()) < mask.numel()
    got_blocks = flat(block_product(lambda y: as_dict(A @ flat(y)), as_dict(x)))
    torch.testing.assert_close(got_blocks, (A * mask) @ x)
    assert not torch.allclose(got_blocks, A @ x, rtol=1e-3)
    blocked_pairs = flat(low_rank_product((got, rows), as_dict(x), blocks=True))
    torch.testing.assert_close(blocked_pairs, ((V @ torch.diag(got) @ V.T) * mask) @ x)


def test_captured_parameters_are_the_recorded_layers(adamw_run):
    """The "captured layers" sweep keeps curvature among the Linear/Conv1D layers' weights and
    biases (the tied lm_head standing as the input embedding's matrix), not the layer norms or
    position embeddings, which a capture does not record."""
    from exact_adamw import captured_parameters

    keep = captured_parameters(adamw_run)
    names = set(adamw_run.initial)
    assert "transformer.wte.weight" in keep and "transformer.wpe.weight" not in keep
    assert {n for n in names if ".ln_" in n or "ln_f" in n}.isdisjoint(keep)
    assert {n for n in names if n.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))} <= keep
    assert keep < names


def test_sampled_label_rows_estimate_the_gauss_newton_product(adamw_run):
    """The "sampled" curvature's rows (the product's pseudo-loss, labels drawn from the model)
    average to the exact Gauss-Newton quadratic form of the batch's mean loss; the pseudo-loss's
    earlier plain mean over tokens came out about T times too small (docs/method.md §3)."""
    from exact_adamw import fisher_product, sampled_rows

    rp = adamw_run
    b, _ = rp.batch(1)
    theta = {n: x.clone() for n, x in rp.initial.items()}
    p = {n: x.clone().requires_grad_(True) for n, x in theta.items()}
    gen = torch.Generator().manual_seed(0)
    x = {n: torch.randn(v.shape, dtype=v.dtype, generator=gen) for n, v in theta.items()}
    want = float(sum((g * x[n]).sum() for n, g in rp.ggn_vector_product(theta, b, x).items()))
    fx = fisher_product(sampled_rows(rp, p, b, step=1, draws=400), p, x)
    got = float(sum((f * x[n]).sum() for n, f in fx.items()))
    tokens = float((b["labels"][:, 1:] != -100).sum(1).double().mean())
    assert tokens > 4  # a ratio of T would show
    assert want > 0 and abs(got / want - 1) < 0.15, (got, want, tokens)


def test_factored_preconditioner_is_exact_on_a_rank_one_second_moment():
    """The bench's factored P (the capture's ρ γᵀ) recovers 1/√v̂ where v̂ is itself an outer
    product, and moves it otherwise; vectors keep their exact P."""
    from exact_adamw import factored_preconditioner

    gen = torch.Generator().manual_seed(0)
    r, c = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5, torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    eps = 1e-12
    exact = {"w": 1 / ((r[:, None] * c[None, :]).sqrt() + eps), "b": torch.rand(3, generator=gen, dtype=torch.float64)}
    out = factored_preconditioner(exact, eps)
    torch.testing.assert_close(out["w"], exact["w"], rtol=1e-9, atol=0)
    assert out["b"] is exact["b"]
    skew = {"w": exact["w"].clone()}
    skew["w"][0, 0] *= 10
    assert not torch.allclose(factored_preconditioner(skew, eps)["w"], skew["w"], rtol=1e-3)


def test_projected_sweep_without_a_projection_is_the_captured_full_space_sweep(adamw_run):
    """The projected sweep (the pipeline's space) with the identity in place of the projection
    is the full-space sampled sweep restricted to the captured layers, to rounding; a Kronecker
    projection of the capture's form changes the values (the comparison can fail)."""
    from exact_adamw import Projection, projected_sweeps, projected_values

    rp = adamw_run
    full = adjoint_values(rp, curvature="sampled", draws=2, captured=True, factored=True, only_captured=True)
    same = projected_values(rp, ("identity",), draws=2, factored=True)
    assert np.abs(full).max() > 0
    np.testing.assert_allclose(same, full, rtol=1e-8, atol=1e-10 * np.abs(full).max())
    kron = projected_values(rp, ("kronecker", 4), draws=2, factored=True)
    assert not np.allclose(kron, full, rtol=1e-2)
    # several projections in one sweep are each one's own sweep; other label draws move the values
    both = projected_sweeps(rp, [("identity",), ("kronecker", 4)], draws=2, factored=True)
    np.testing.assert_allclose(both[0], same, rtol=1e-12, atol=1e-14 * np.abs(full).max())
    np.testing.assert_allclose(both[1], kron, rtol=1e-12, atol=1e-14 * np.abs(full).max())
    redrawn = projected_values(rp, ("identity",), draws=2, factored=True, draw_seed=1)
    assert not np.allclose(redrawn, same, rtol=1e-3, atol=0)
    # the Kronecker block is P_s G P_aᵀ of the capture's G = [∂W | ∂b] in (d_out × d_in + 1)
    proj = Projection(rp, "kronecker", 4)
    w, b, transpose, (ps, pa) = proj.blocks[0]
    g = {n: torch.randn_like(x) for n, x in rp.initial.items()}
    G = torch.cat([g[w].t() if transpose else g[w], g[b][:, None]], dim=1)
    torch.testing.assert_close(proj(g)[:16], (ps @ G @ pa.t()).reshape(-1))
