#!/usr/bin/env python
"""Exact first-order response of a finished AdamW run: metagradients through the whole trajectory.

Replays the run in float64 in one process (its initial weights, its token shards step by
step, its recorded learning rates, DeepSpeed's global-norm clip, torch's AdamW with bias
correction and decoupled weight decay) with every occurrence's loss weight a leaf w_{t,z} = 1,
and differentiates the final validation loss with respect to all of them in one backward pass:

    exact(t, z) = −∂ℓ_val(θ_T) / ∂w_{t,z}

which is the ε → 0 limit of Δloss/ε for the removal of weight ε (rayattr's sign: positive =
the occurrence helped). Nothing is approximated: m, v, the clip factor κ, the bias corrections
and the curvature all respond. Freezing a piece of the optimizer (its dependence on w cut with
`detach`) gives the exact response of a run in which that piece is held at the run's values,
which is how the ablation in docs/method.md §9 tells which frozen quantity costs what:

    freeze={"kappa"}     κ_t held (rayattr's recursion)
    freeze={"v"}         v_t (so P_t) held
    freeze={"kappa", "v"} both: the quantity rayattr's AdamW recursion linearises

The metagradients are the product's checkpointed reverse pass (`rayattr exact`); the sweeps
keep every step's θ and P. Only for small models.

    python bench/exact_adamw.py RUN_URI [--steps-from A --steps-to B]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rayattr.capture import sampled_label_losses, select_layers, token_counts  # noqa: E402
from rayattr.capture.layers import layer_info  # noqa: E402
from rayattr.capture.precondition import factor_second_moment  # noqa: E402
from rayattr.exact.metagradient import exact_values  # noqa: E402
from rayattr.exact.replay import Replay, sqrt0  # noqa: E402
from rayattr.model.loss import SAMPLE_LOSS_REDUCTION, logits_of  # noqa: E402
from rayattr.store import Run  # noqa: E402
from rayattr.store.layout import SAMPLE_VALUES  # noqa: E402


class AdamWReplay(Replay):
    """The product's float64 replay (rayattr/exact) with what the ablation adds: the
    Gauss-Newton product, a traced forward pass, and (steps × |B|) arrays of values."""

    def __init__(self, run: Run):
        super().__init__(run)
        if self.optimizer != "adamw":
            raise SystemExit(f"{run.uri} trained with {self.optimizer}; this reference replays AdamW")

    def occurrences(self) -> tuple[np.ndarray, np.ndarray]:
        """(sample ids, steps) of the run's occurrences, (steps × |B|) each: the layout of every
        column of values here."""
        ids = np.stack([self.batch(t)[1] for t in range(self.num_steps)])
        return ids, np.arange(self.num_steps)[:, None].repeat(ids.shape[1], 1)

    def ggn_vector_product(self, theta: dict, b: dict, x: dict) -> dict:
        """G x for the Gauss-Newton matrix of the batch's mean loss, Jᵀ (∂²ℓ/∂logits²) J x: the
        curvature the sampled-label Fisher estimates without bias (docs/method.md §3)."""
        from torch.func import jvp, vjp

        def logits(q):
            return functional_call(self.model, q, (), {"input_ids": b["input_ids"],
                                                       "attention_mask": b["attention_mask"]}).logits[:, :-1]

        out, dz = jvp(logits, (theta,), (x,))
        labels = b["labels"][:, 1:]
        keep = (labels != -100).to(out.dtype)
        weight = keep / keep.sum(1, keepdim=True).clamp(min=1) / out.shape[0]  # mean over tokens, then samples
        prob = torch.softmax(out, -1)
        hz = prob * dz - prob * (prob * dz).sum(-1, keepdim=True)  # (diag(p) − ppᵀ) dz per token
        _, pull = vjp(logits, theta)
        (gx,) = pull(hz * weight.unsqueeze(-1))
        return {n: v.detach() for n, v in gx.items()}

    def unroll(self, weights: torch.Tensor, trace: list | None = None, anchor: bool = True) -> dict:
        """θ_T of the run with loss weights `weights` (steps × global batch), no graph, re-seated
        on the states the run kept; `trace` receives (θ_t, P_t, κ_t) of every step."""
        state, anchors = self.initial_state(), set(self.anchor_steps() if anchor else ())
        for t in range(self.num_steps):
            if t in anchors:  # the run's own state, where it kept one (as the metagradients do)
                state = self.recorded_state(t)
            theta = state.params
            state, kappa, _ = self.step(state, t, weights[t], differentiable=False)
            if trace is not None:
                k = self.records[t].adam_step or t + 1
                P = {n: 1 / (sqrt0(v / (1 - self.beta2 ** k)) + self.eps) for n, v in state.v.items()}
                trace.append((theta, P, kappa))
        return state.params

    def exact_values(self, freeze: frozenset = frozenset()) -> tuple[np.ndarray, np.ndarray]:
        """(values, ids): −∂ℓ_val/∂w for every occurrence, as (steps × |B|) arrays, by the
        product's checkpointed reverse pass (rayattr/exact/metagradient.py)."""
        table = exact_values(self, freeze=freeze).samples
        ids = np.stack([self.batch(t)[1] for t in range(self.num_steps)])
        value = {(s, z): v for s, z, v in zip(*(table[c].to_pylist() for c in ("step", "sample_id", "value")))}
        out = np.array([[value[(t, int(z))] for z in row] for t, row in enumerate(ids)])
        return out, ids

    def removal_response(self, step: int, sample_id: int, eps: float) -> float:
        """(ℓ_val(w_{t,z} = 1 − ε) − ℓ_val(w = 1)) / ε by two float64 retrains (no graph), from
        the initial weights: a kept state would undo the removal."""
        B = self.batch(0)[1].shape[0]
        ones = torch.ones(self.num_steps, B, dtype=torch.float64)
        base = float(self.val_loss(self.unroll(ones, anchor=False)))
        w = ones.clone()
        col = int(np.flatnonzero(self.batch(step)[1] == sample_id)[0])
        w[step, col] = 1 - eps
        return (float(self.val_loss(self.unroll(w, anchor=False))) - base) / eps


def backward_steps(rp: AdamWReplay, factored: bool = False):
    """(the validation loss's gradient at the final weights, every step's (θ_t, P_t, κ_t), the
    steps from the last back): each (t, its record, θ_t, P_t (the capture's factored one with `factored`), κ_t, its batch,
    |B|, the bias-corrected momentum factor (1 − β₁)/(1 − β₁^(t+1))), as a backward sweep reads
    them; the trajectory replayed once, every step's state kept."""
    T, b1 = rp.num_steps, rp.beta1
    states: list = []
    params = rp.unroll(torch.ones(T, rp.batch(0)[1].shape[0], dtype=torch.float64), trace=states)
    fin = {n: x.clone().requires_grad_(True) for n, x in params.items()}
    grad = dict(zip(fin, torch.autograd.grad(rp.val_loss(fin), list(fin.values()))))

    def steps():
        for t in range(T - 1, -1, -1):
            theta, P, kappa = states[t]
            b, _ = rp.batch(t)
            yield (t, rp.records[t], theta, factored_preconditioner(P, rp.eps) if factored else P, kappa, b,
                   b["input_ids"].shape[0], (1 - b1) / (1 - b1 ** (t + 1)))
    return grad, states, steps()


def adjoint_values(rp: AdamWReplay, curvature: str = "hessian", momentum_curvature: bool = True,
                   top: int = 16, refresh: int = 1, blocks: bool = False, captured: bool = False,
                   draws: int = 1, tokens: bool = False, factored: bool = False,
                   only_captured: bool = False) -> np.ndarray:
    """Values of every occurrence by the first-order adjoint sweep rayattr's recursion runs
    (κ and v frozen, P_s ≈ P_t over the momentum's horizon), in the full parameter space with
    exact P: the reference that tells the recursion's own approximations from the projection.

        r_s = c_s η_s a_{s+1} + β₁ r_{s+1}                     (R's recursion, transposed)
        a_s = α_s a_{s+1} − κ_s |B| H_s P_s r_s                 (momentum-aware curvature)
            = α_s a_{s+1} − κ_s lr_s H_s P_s a_{s+1}            (momentum_curvature=False)
        value(t, z) = κ_t (P_t g_z) · r_t

    `curvature`: "hessian" (exact Hessian-vector products of the mean loss), "ggn" (its
    Gauss-Newton part, which the sampled-label Fisher estimates), "fisher" ((1/|B|) Σ g gᵀ of
    the per-sample gradients: the empirical Fisher rayattr's AdamW recursion uses; with `tokens`,
    (1/|B|) Σ T_s g gᵀ, the empirical Fisher of the tokens' own losses with the cross terms
    between a sample's tokens dropped, on the mean loss's scale as the sampled-label Fisher
    is: docs/method.md §3), "sampled"
    (the same over `draws` pseudo-gradients per sample, labels drawn from the model: the
    sampled-label Fisher, an unbiased estimate of the Gauss-Newton matrix), "subspace"
    (the Hessian compressed onto the span of the step's per-sample gradients, Q Qᵀ H Q Qᵀ: the
    empirical Fisher's rank and range with the true curvature inside, |B| Hessian-vector
    products a step), "top" (the `top` eigenpairs of largest |λ| of P^½ H P^½ at every
    `refresh`-th step, on that step's batch and θ, kept as λ_j and h_j = P^-½ v_j and used for
    the steps up to the next refresh) or "none"
    (K = α I: only decay and momentum carry the update). `blocks` keeps only the curvature's
    block-diagonal part, as a per-layer K does (:func:`block_product`), for "hessian", "ggn",
    "sampled" and "top".
    `captured` keeps the curvature only among the parameters of the layers a capture records
    (:func:`captured_parameters`): the rest of the model gets K = α I, as in the pipeline.
    `factored` puts the capture's Adafactor-factored P (:func:`factored_preconditioner`) in place
    of the exact one for every weight matrix, in K and in the values alike, as the pipeline has it.
    `only_captured` (with `captured`) starts the adjoint from the captured parameters' part of the
    validation gradient alone, so the values are theirs, as a projection of the captured layers
    sees them (:func:`projected_values`)."""
    b1 = rp.beta1
    a, states, steps = backward_steps(rp, factored)
    r = {n: torch.zeros_like(x) for n, x in a.items()}
    out = np.zeros((rp.num_steps, rp.batch(0)[1].shape[0]))
    keep = captured_parameters(rp) if captured else set(a)  # where K has curvature
    if only_captured:  # the rest of the adjoint then stays zero: K has no curvature there
        a = {n: x if n in keep else torch.zeros_like(x) for n, x in a.items()}
    refreshed, pairs, basis = None, None, None  # the top curvature's last refresh step, (λ, rows), basis
    for t, rec, theta, P, kappa, b, B, c in steps:
        r = {n: c * rec.lr / B * a[n] + b1 * r[n] for n in a}
        p = {n: x.clone().requires_grad_(True) for n, x in theta.items()}
        per = rp.per_sample(p, b)
        rows = [torch.autograd.grad(per[i], list(p.values()), retain_graph=True) for i in range(B)]
        for i, g in enumerate(rows):
            out[t, i] = kappa * float(sum((P[n] * gi * r[n]).sum() for n, gi in zip(p, g)))
        x = r if momentum_curvature else {n: rec.lr / B * a[n] for n in a}
        Px = {n: P[n] * x[n] if n in keep else torch.zeros_like(x[n]) for n in x}
        if curvature == "hessian":
            gbar = torch.autograd.grad(per.mean(), list(p.values()), create_graph=True)

            def hessian(y: dict) -> dict:
                return dict(zip(p, (h.detach() for h in torch.autograd.grad(
                    gbar, list(p.values()), grad_outputs=[y[n] for n in p], retain_graph=True))))
            hv = curvature_product(hessian, Px, blocks)
        elif curvature == "ggn":
            hv = curvature_product(lambda y: rp.ggn_vector_product(theta, b, y), Px, blocks)
        elif curvature == "none":
            hv = {n: torch.zeros_like(x) for n, x in a.items()}
        elif curvature == "top":
            start = t - t % refresh
            if refreshed != start:  # warm-started from the later refresh's basis
                lam, top_rows, basis = top_pairs(rp, states[start], start, top, start=basis)
                refreshed, pairs = start, (lam, top_rows)
            hv = low_rank_product(pairs, Px, blocks)
        elif curvature == "subspace":
            hv = subspace_hessian_product(p, per, rows, Px)
        elif curvature == "sampled":
            drawn = sampled_rows(rp, p, b, t, draws)
            hv = curvature_product(lambda y: fisher_product(drawn, p, y), Px, blocks)
        elif curvature == "fisher" and tokens:  # each row × √T_s: the tokens' Fisher, cross terms dropped
            counts = token_counts(b["labels"][:, 1:]).double().sqrt()
            scaled = [tuple(gi * float(counts[i]) for gi in g) for i, g in enumerate(rows)]
            hv = curvature_product(lambda y: fisher_product(scaled, p, y), Px, blocks)
        elif curvature == "fisher":
            hv = fisher_product(rows, p, Px)
        else:
            raise ValueError(f"unknown curvature {curvature!r}")
        hv = {n: h if n in keep else torch.zeros_like(h) for n, h in hv.items()}  # H restricted to `keep`
        a = {n: (1 - rec.lr * rp.wd) * a[n] - kappa * B * hv[n] for n in a}
    return out


class Projection:
    """A random projection of the captured layers' gradients, one block per layer, to tell how
    much the projection's structure costs the recursion (docs/method.md §9). Each layer's
    gradient is taken as the capture takes it, G = [∂W | ∂b] in (d_out × d_in + 1), and
    compressed by `kind`: "kronecker" (P_s G P_aᵀ with Gaussian P_s, P_a of `size` rows each,
    entries N(0, 1/size): the capture's own form), "dense" (one Gaussian matrix of `size` rows
    on vec G, entries N(0, 1/size)) or "identity" (vec G: only the captured layers, no
    projection). `then` follows a Kronecker projection with a dense Gaussian one of its vector
    to `then` rows: a Kronecker projection's cost with more of a dense one's accuracy."""

    def __init__(self, rp: AdamWReplay, kind: str, size: int = 16, then: int | None = None, seed: int = 0):
        if kind not in ("kronecker", "dense", "identity"):
            raise ValueError(f"unknown projection {kind!r}")
        names = {id(p): n for n, p in rp.model.named_parameters()}
        gen = torch.Generator().manual_seed(seed)
        self.kind, self.blocks = kind, []
        for name, module in select_layers(rp.model, rp.cfg.capture.layers).items():
            info = layer_info(name, module)  # the capture's shapes, the bias counted as an input column
            w = names[id(module.weight)]
            b = names[id(module.bias)] if info.has_bias else None
            transpose = not isinstance(module, torch.nn.Linear)  # Conv1D keeps (d_in × d_out)
            d_out, d_in = info.d_out, info.d_in_aug
            if kind == "kronecker":
                mats = (torch.randn(size, d_out, generator=gen, dtype=torch.float64) / size ** 0.5,
                        torch.randn(size, d_in, generator=gen, dtype=torch.float64) / size ** 0.5)
            elif kind == "dense":
                mats = (torch.randn(size, d_out * d_in, generator=gen, dtype=torch.float64) / size ** 0.5,)
            else:
                mats = ()
            if then is not None:
                mats += (torch.randn(then, size * size, generator=gen, dtype=torch.float64) / then ** 0.5,)
            self.blocks.append((w, b, transpose, mats))

    def __call__(self, g: dict) -> torch.Tensor:
        """The projected gradient of the captured layers, one vector; `g` maps names to tensors."""
        out = []
        for w, b, transpose, mats in self.blocks:
            G = g[w].t() if transpose else g[w]
            if b is not None:
                G = torch.cat([G, g[b][:, None]], dim=1)
            if self.kind == "kronecker":
                y = (mats[0] @ G @ mats[1].t()).reshape(-1)
                out.append(mats[2] @ y if len(mats) > 2 else y)
            elif self.kind == "dense":
                out.append(mats[0] @ G.reshape(-1))
            else:
                out.append(G.reshape(-1))
        return torch.cat(out)


def projected_values(rp: AdamWReplay, projection: tuple, draws: int = 4, factored: bool = False,
                     draw_seed: int = 0) -> np.ndarray:
    """:func:`adjoint_values`' momentum-aware sampled-label sweep run in a projected space, as the
    pipeline runs it: the validation gradient, the update rows P g and the curvature rows ĝ
    (the same label draws) are projected by :class:`Projection`(*`projection`) and the adjoint
    lives there,

        r_s = c_s η_s a_{s+1} + β₁ r_{s+1}
        a_s = α_s a_{s+1} − κ_s |B| (1/n) Σ_j Πĝ_j ⟨Π(P ĝ_j), r_s⟩
        value(t, z) = κ_t ⟨Π(P_t g_z), r_t⟩

    so the only difference from the full-space sweep with `captured` is the projection (and the
    uncaptured parameters' part of the values, which "identity" shows alone)."""
    return projected_sweeps(rp, [projection], draws, factored, draw_seed)[0]


def projected_sweeps(rp: AdamWReplay, projections: list[tuple], draws: int = 4, factored: bool = False,
                     draw_seed: int = 0) -> list[np.ndarray]:
    """:func:`projected_values` for several projections at once: one adjoint per projection over
    the same per-sample gradients and label draws, which cost the sweep almost all its time, so
    the spread over projection seeds costs one sweep. `draw_seed` picks another set of label
    draws (:func:`sampled_rows`), for the spread over draws."""
    projs = [Projection(rp, *projection) for projection in projections]
    b1 = rp.beta1
    grad, _, steps = backward_steps(rp, factored)
    adj = [proj(grad) for proj in projs]
    mom = [torch.zeros_like(a) for a in adj]
    outs = [np.zeros((rp.num_steps, rp.batch(0)[1].shape[0])) for _ in projs]
    for t, rec, theta, P, kappa, b, B, c in steps:
        mom = [c * rec.lr / B * a + b1 * r for a, r in zip(adj, mom)]
        p = {n: x.clone().requires_grad_(True) for n, x in theta.items()}
        per = rp.per_sample(p, b)
        for i in range(B):
            g = dict(zip(p, torch.autograd.grad(per[i], list(p.values()), retain_graph=True)))
            pg = {n: P[n] * x for n, x in g.items()}
            for proj, r, out in zip(projs, mom, outs):
                out[t, i] = kappa * float(proj(pg) @ r)
        drawn = [dict(zip(p, g)) for g in sampled_rows(rp, p, b, t, draws, draw_seed)]
        hv = [torch.zeros_like(a) for a in adj]
        for g in drawn:
            pg = {n: P[n] * x for n, x in g.items()}
            for proj, r, h in zip(projs, mom, hv):
                h += proj(g) * float(proj(pg) @ r) / len(drawn)
        adj = [(1 - rec.lr * rp.wd) * a - kappa * B * h for a, h in zip(adj, hv)]
    return outs


def factored_preconditioner(P: dict, eps: float) -> dict:
    """P with each weight matrix's exact 1/(√v̂ + ε) replaced by the capture's ρ γᵀ from v̂'s row and
    column sums (rayattr/capture/precondition.py; the same in either orientation); vectors keep
    theirs."""
    out = {}
    for n, x in P.items():
        if x.dim() != 2:
            out[n] = x
            continue
        v_hat = (1 / x - eps).clamp_min(0) ** 2
        rho, gamma = factor_second_moment(v_hat, eps)
        out[n] = rho[:, None] * gamma[None, :]
    return out


def top_pairs(rp: AdamWReplay, state: tuple, t: int, k: int, iterations: int = 8, seed: int = 0,
              start: torch.Tensor | None = None) -> tuple:
    """(λ, rows, basis): the k eigenpairs of largest |λ| of S = P^½ H P^½ for step t's batch
    Hessian H at θ_t, by subspace iteration with k + 8 probes and a Rayleigh–Ritz step, returned
    as H ≈ Σ_j λ_j h_j h_jᵀ with h_j = P^-½ v_j (one dict per pair). `start` (a previous call's
    basis) warm-starts it: two iterations then do what eight do from random probes."""
    theta, P, _ = state
    b, _ = rp.batch(t)
    p = {n: x.clone().requires_grad_(True) for n, x in theta.items()}
    names = list(p)
    shapes, sizes = [p[n].shape for n in names], [p[n].numel() for n in names]
    half = torch.cat([P[n].reshape(-1).sqrt() for n in names])
    gbar = torch.autograd.grad(rp.per_sample(p, b).mean(), list(p.values()), create_graph=True)

    def S(x: torch.Tensor) -> torch.Tensor:
        probe = [c.reshape(s) for c, s in zip((half * x).split(sizes), shapes)]
        hx = torch.autograd.grad(gbar, list(p.values()), grad_outputs=probe, retain_graph=True)
        return half * torch.cat([h.reshape(-1) for h in hx])

    if start is None:
        gen = torch.Generator().manual_seed(seed + t)
        Q, _ = torch.linalg.qr(torch.randn(half.numel(), k + 8, generator=gen, dtype=torch.float64))
    else:
        Q, iterations = start, 2
    for _ in range(iterations):
        Q, _ = torch.linalg.qr(torch.stack([S(Q[:, j]) for j in range(Q.shape[1])], 1))
    SQ = torch.stack([S(Q[:, j]) for j in range(Q.shape[1])], 1)
    lam, U = torch.linalg.eigh((Q.T @ SQ + SQ.T @ Q) / 2)
    keep = lam.abs().argsort(descending=True)[:k]
    V = (Q @ U[:, keep]) / half.clamp(min=1e-300)[:, None]
    rows = [{n: c.reshape(s).detach() for n, c, s in zip(names, V[:, j].split(sizes), shapes)}
            for j in range(V.shape[1])]
    return lam[keep].detach(), rows, (Q @ U).detach()


def captured_parameters(rp: AdamWReplay) -> set[str]:
    """The parameters (weights and biases) of the layers the run's capture records
    (`capture.layers`, chosen as the capture chooses them). A tied lm_head is the input
    embedding's matrix, which then stands for both of its uses."""
    names = {id(p): n for n, p in rp.model.named_parameters()}
    layers = select_layers(rp.model, rp.cfg.capture.layers)
    return {names[id(p)] for m in layers.values() for p in m.parameters(recurse=False) if id(p) in names}


def block_product(product, x: dict) -> dict:
    """The block-diagonal part of a curvature `product`: each weight matrix's own block (a
    per-layer K's), and one block for the vectors (biases, layer norms)."""
    groups = [[n] for n, v in x.items() if v.dim() == 2] + [[n for n, v in x.items() if v.dim() < 2]]
    out = {}
    for names in groups:
        part = product({n: v if n in names else torch.zeros_like(v) for n, v in x.items()})
        out.update({n: part[n] for n in names})
    return out


def curvature_product(product, x: dict, blocks: bool) -> dict:
    """`product`(x), or with `blocks` its block-diagonal part (:func:`block_product`)."""
    return block_product(product, x) if blocks else product(x)


def low_rank_product(pairs: tuple, x: dict, blocks: bool) -> dict:
    """Σ_j λ_j h_j ⟨h_j, x⟩ for (λ, rows) of :func:`top_pairs`; with `blocks` only its
    block-diagonal part, in :func:`block_product`'s blocks."""
    if blocks:
        return block_product(lambda y: low_rank_product(pairs, y, False), x)
    lam, rows = pairs
    out = {n: torch.zeros_like(v) for n, v in x.items()}
    for lj, h in zip(lam.tolist(), rows):
        dot = sum((h[n] * x[n]).sum() for n in x)
        for n in x:
            out[n] += lj * dot * h[n]
    return out


def sampled_rows(rp: AdamWReplay, p: dict, b: dict, step: int, draws: int = 1, draw_seed: int = 0) -> list:
    """Sampled-label pseudo-gradients of every sample at `p`, `draws` label draws each (seeded
    by the step, and by `draw_seed` when it is not 0), from the product's own pseudo-loss:
    (1/len) Σ ĝ ĝᵀ over them estimates the batch mean loss's Gauss–Newton matrix without bias
    (docs/method.md §3)."""
    # torch's CPU generator keeps a seed's low 32 bits only: the draw seed must move those
    gen = torch.Generator().manual_seed(draw_seed * 1_000_003 + step)  # draw_seed 0: the step alone
    logits = logits_of(lambda **inputs: functional_call(rp.model, p, (), inputs),
                       b["input_ids"], b["attention_mask"])[:, :-1]
    rows = []
    for _ in range(draws):
        losses = sampled_label_losses(logits, generator=gen, mask=b["labels"][:, 1:] != -100,
                                      reduction=SAMPLE_LOSS_REDUCTION)
        rows += [torch.autograd.grad(losses[i], list(p.values()), retain_graph=True) for i in range(len(losses))]
    return rows


def fisher_product(rows: list, p: dict, x: dict) -> dict:
    """(1/|B|) Σ g gᵀ x over the per-sample gradient `rows` (each in the order of `p`'s names)."""
    out = {n: torch.zeros_like(v) for n, v in x.items()}
    for g in rows:
        dot = sum((gi * x[n]).sum() for n, gi in zip(p, g))
        for n, gi in zip(p, g):
            out[n] += dot * gi / len(rows)
    return out


def subspace_hessian_product(p: dict, per: torch.Tensor, rows: list, x: dict) -> dict:
    """Q Qᵀ H Q Qᵀ x for the mean loss's Hessian H at `p` and Q an orthonormal basis of the
    per-sample gradients `rows` (|B| Hessian-vector products)."""
    names = list(p)
    G = torch.stack([torch.cat([gi.reshape(-1) for gi in g]) for g in rows])  # (|B|, n)
    U, S, _ = torch.linalg.svd(G.T, full_matrices=False)
    Q = U[:, S > S.max() * 1e-10]  # (n, k)
    gbar = torch.autograd.grad(per.mean(), list(p.values()), create_graph=True)
    shapes = [p[n].shape for n in names]
    sizes = [p[n].numel() for n in names]
    HQ = []
    for j in range(Q.shape[1]):
        probe = [c.reshape(s) for c, s in zip(Q[:, j].split(sizes), shapes)]
        hq = torch.autograd.grad(gbar, list(p.values()), grad_outputs=probe, retain_graph=True)
        HQ.append(torch.cat([h.reshape(-1) for h in hq]))
    M = Q.T @ torch.stack(HQ, 1)  # (k, k): Qᵀ H Q
    xv = torch.cat([x[n].reshape(-1) for n in names])
    out = Q @ (M @ (Q.T @ xv))
    return {n: c.reshape(s).detach() for n, c, s in zip(names, out.split(sizes), shapes)}


BANDS = {"warm-up": lambda s, T, w: s < w, "middle": lambda s, T, w: (s >= T // 4) & (s < 3 * T // 4),
         "last quarter": lambda s, T, w: s >= 3 * T // 4}


METAGRADIENTS = (("exact", ()), ("κ held", ("kappa",)), ("v held", ("v",)), ("κ, v held", ("kappa", "v")))
ADJOINTS = (("recursion, Hessian", {"curvature": "hessian"}),
            ("recursion, Hessian, momentum-free K", {"curvature": "hessian", "momentum_curvature": False}),
            ("recursion, Gauss-Newton", {"curvature": "ggn"}),
            ("recursion, Hessian on the gradients' span", {"curvature": "subspace"}),
            ("recursion, no curvature", {"curvature": "none"}),
            ("recursion, sampled-label Fisher", {"curvature": "sampled"}),
            ("recursion, empirical Fisher", {"curvature": "fisher"}),
            ("recursion, empirical Fisher, momentum-free K", {"curvature": "fisher", "momentum_curvature": False}),
            ("recursion, Hessian, per layer", {"curvature": "hessian", "blocks": True}),
            ("recursion, Gauss-Newton, per layer", {"curvature": "ggn", "blocks": True}),
            ("recursion, Hessian, captured layers", {"curvature": "hessian", "captured": True}))
NAMED_ADJOINTS = (  # tens of Hessian-vector products or draws a step: computed only when named (--sweeps)
            ("recursion, Hessian top 16, every step", {"curvature": "top", "top": 16}),
            ("recursion, Hessian top 32, every step", {"curvature": "top", "top": 32}),
            ("recursion, Hessian top 16, every 16 steps", {"curvature": "top", "top": 16, "refresh": 16}),
            ("recursion, Hessian top 16, every 16 steps, per layer",
             {"curvature": "top", "top": 16, "refresh": 16, "blocks": True}),
            ("recursion, Hessian top 64, every 16 steps", {"curvature": "top", "top": 64, "refresh": 16}),
            ("recursion, sampled-label Fisher, per layer", {"curvature": "sampled", "blocks": True}),
            ("recursion, sampled-label Fisher, captured layers", {"curvature": "sampled", "captured": True}),
            ("recursion, empirical Fisher × T", {"curvature": "fisher", "tokens": True}),
            ("recursion, empirical Fisher × T, per layer", {"curvature": "fisher", "tokens": True, "blocks": True}),
            ("recursion, sampled-label Fisher, 4 draws", {"curvature": "sampled", "draws": 4}),
            ("recursion, sampled-label Fisher, 4 draws, per layer", {"curvature": "sampled", "draws": 4, "blocks": True}),
            ("recursion, sampled-label Fisher, 4 draws, captured layers",
             {"curvature": "sampled", "draws": 4, "captured": True}),
            ("recursion, sampled-label Fisher, 4 draws, captured layers, factored P",
             {"curvature": "sampled", "draws": 4, "captured": True, "factored": True}),
            ("recursion, sampled-label Fisher, 4 draws, captured layers, momentum-free K",
             {"curvature": "sampled", "draws": 4, "captured": True, "momentum_curvature": False}),
            ("recursion, sampled-label Fisher, 16 draws", {"curvature": "sampled", "draws": 16}),
            ("recursion, sampled-label Fisher, 4 draws, captured layers only, factored P",
             {"projection": ("identity",), "factored": True}),
            ("recursion, sampled-label Fisher, 4 draws, factored P, Kronecker projection r = 16",
             {"projection": ("kronecker", 16), "factored": True}),
            ("recursion, sampled-label Fisher, 4 draws, factored P, dense projection p = 256",
             {"projection": ("dense", 256), "factored": True}),
            ("recursion, sampled-label Fisher, 4 draws, factored P, Kronecker projection r = 64",
             {"projection": ("kronecker", 64), "factored": True}),
            ("recursion, sampled-label Fisher, 4 draws, factored P, Kronecker r = 64 then dense p = 256",
             {"projection": ("kronecker", 64, 256), "factored": True}),
            ("recursion, sampled-label Fisher, 4 draws, factored P, Kronecker r = 64 then dense p = 1024",
             {"projection": ("kronecker", 64, 1024), "factored": True}))


def values_column(run: Run, rp: AdamWReplay) -> np.ndarray:
    """`run`'s values/samples.parquet in `rp`'s layout (:meth:`AdamWReplay.occurrences`), NaN
    where it has no value; `run` is `rp`'s run or another on the same trajectory."""
    t = run.read_table(SAMPLE_VALUES).select(["step", "sample_id", "value"]).to_pydict()
    value = {(s, z): v for s, z, v in zip(t["step"], t["sample_id"], t["value"])}
    ids, steps = rp.occurrences()
    return np.vectorize(lambda s, z: value.get((int(s), int(z)), np.nan))(steps, ids)


def ablation(rp: AdamWReplay, values: np.ndarray | None = None, adjoints: bool | list[str] = True,
             metagradients: bool | list[str] = True, cache: Path | None = None) -> dict[str, np.ndarray]:
    """Every estimate of the run's occurrences, (steps × |B|) each: the exact response, the
    exact response with κ and/or v held, rayattr's recursion in the full parameter space
    (exact P, no projection) with each curvature, and the product's `values` when given
    (:func:`values_column`).
    `cache` (an .npz) keeps each column once computed, so a later call computes only the rest
    (the metagradients hold the whole unrolled graph; the sweeps do not)."""
    cols = dict(np.load(cache)) if cache is not None and cache.exists() else {}
    metas = [n for n, _ in METAGRADIENTS] if metagradients is True else list(metagradients or [])
    wanted = [(n, lambda fr=dict(METAGRADIENTS)[n]: rp.exact_values(frozenset(fr))[0]) for n in metas]
    sweeps = [n for n, _ in ADJOINTS] if adjoints is True else list(adjoints or [])
    wanted += [(n, lambda kw=dict(ADJOINTS + NAMED_ADJOINTS)[n]: projected_values(rp, **kw) if "projection" in kw
                else adjoint_values(rp, **kw)) for n in sweeps]
    for name, compute in wanted:
        if name not in cols:
            cols[name] = compute()
            if cache is not None:
                np.savez(cache, **cols)
    order = [n for n, _ in METAGRADIENTS + ADJOINTS + NAMED_ADJOINTS]
    cols = {n: cols[n] for n in sorted(cols, key=lambda n: order.index(n) if n in order else len(order))}
    if values is not None:
        cols["rayattr values"] = values
    return cols


def table(cols: dict[str, np.ndarray], warmup: int) -> str:
    """Spearman and rms ratio of each estimate against the exact response and against the
    κ-and-v-held response, per band of steps."""
    from scipy.stats import spearmanr

    T = next(iter(cols.values())).shape[0]
    steps = np.arange(T)[:, None].repeat(next(iter(cols.values())).shape[1], 1)
    lines = ["| estimate | " + " | ".join(f"{b} vs exact | {b} vs κ,v held" for b in BANDS) + " |",
             "|---|" + "---:|" * (2 * len(BANDS))]
    for name, x in cols.items():
        cells = []
        for pick in BANDS.values():
            m = pick(steps, T, warmup) & np.isfinite(x)
            for ref in ("exact", "κ, v held"):
                if ref not in cols:  # the metagradients not computed
                    cells.append("–")
                    continue
                a, b = x[m], cols[ref][m]
                if len(a) < 3:  # a band a short run does not have
                    cells.append("–")
                    continue
                rho = spearmanr(a, b)[0]
                ratio = np.sqrt(np.mean(a ** 2) / np.mean(b ** 2))
                cells.append(f"{rho:+.2f} / {ratio:.3g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--check", type=int, default=0, help="check N occurrences against float64 retrains at ε=1e-3")
    ap.add_argument("--no-adjoints", action="store_true", help="only the metagradients (minutes, not tens)")
    ap.add_argument("--no-metagradients", action="store_true",
                    help="only the sweeps (no unrolled graph: the memory of one step)")
    ap.add_argument("--metagradients", help="the metagradients to compute, their names joined by ';' (default: all)")
    ap.add_argument("--sweeps", help="the sweeps to compute, their names joined by ';' (default: all but the Hessian top-k ones)")
    ap.add_argument("--cache", type=Path, help="an .npz that keeps each computed column for the next call")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    run = Run.open_uri(args.run)
    rp = AdamWReplay(run)
    values = values_column(run, rp) if run.exists(SAMPLE_VALUES) else None
    def columns(named: str | None, off: bool, known: tuple) -> bool | list[str]:
        """The columns named on the command line (';'-joined), else the default set or none."""
        if not named:
            return not off
        names = named.split(";")
        unknown = set(names) - {n for n, _ in known}
        if unknown:
            ap.error(f"unknown columns {sorted(unknown)}; choose from {[n for n, _ in known]}")
        return names

    sweeps = columns(args.sweeps, args.no_adjoints, ADJOINTS + NAMED_ADJOINTS)
    metas = columns(args.metagradients, args.no_metagradients, METAGRADIENTS)
    cols = ablation(rp, values, adjoints=sweeps, metagradients=metas,
                    cache=args.cache)
    warmup = int(np.argmax([r.lr for r in rp.records]))  # the step the warm-up peaks at
    print(f"{run.uri}: {rp.num_steps} steps; Spearman / rms ratio per band (warm-up: steps < {warmup})")
    print(table(cols, warmup))
    ids, steps = (x.ravel() for x in rp.occurrences())
    for i in np.random.default_rng(0).choice(len(steps), size=args.check if "exact" in cols else 0, replace=False):
        fd = rp.removal_response(int(steps[i]), int(ids[i]), 1e-3)
        print(f"check {ids[i]}@{steps[i]}: metagradient {cols['exact'].ravel()[i]:.4e}  retrain(ε=1e-3) {fd:.4e}")


if __name__ == "__main__":
    main()
