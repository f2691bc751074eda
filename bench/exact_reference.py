"""Exact first-order values of a small run, without projection or curvature approximations.

Replays a finished run's trajectory in float64 in one process (the same initial weights,
batch plan, SGD step and DeepSpeed's global-norm clipping), then runs the vector chain
backwards with exact Hessian-vector products:

    w_T = ∇ℓ_val(θ_T);   value(t, z) = u_{t,z} · w_{t+1};   w_t = J_tᵀ w_{t+1}

where u_{t,z} is the derivative of step t's update with respect to z's loss weight and J_t the
Jacobian of the step. `clip="exact"` differentiates through the clip factor κ = c/‖ḡ‖ (the
true linear response of the clipped step: u = κη(I − ĝĝᵀ)g); `clip="frozen"` keeps κ fixed as
rayattr's recursion does; `curvature=False` drops H (J = I, a TracIn-like sum at θ_T).

This is the reference that tells the approximations (projection, Fisher for Hessian, frozen
κ) from what no first-order method can see (a finite removal in a non-linear trajectory).
Only for small models: it keeps every θ_t in memory.
"""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load
from torch.func import functional_call, jvp

from rayattr.config import Config
from rayattr.data import BatchPlan, TokenizedDataset, load_tokenizer
from rayattr.model.gradients import mean_loss
from rayattr.store import Run
from rayattr.model.build import build_model


class Replay:
    def __init__(self, run: Run):
        self.run = run
        self.cfg = cfg = Config.from_dict(run.manifest["config"])
        tok = load_tokenizer(cfg.data.tokenizer)
        self.data = TokenizedDataset(run.read_table("data/train.parquet"), tok, cfg.data.seq_len)
        self.val = TokenizedDataset(run.read_table("data/validation.parquet"), tok, cfg.data.seq_len)
        t = cfg.train
        self.plan = BatchPlan(len(self.data), t.micro_batch, t.ranks, t.grad_accum, t.epochs, t.seed)
        self.num_steps = int(run.manifest["num_steps"])
        self.model = build_model(cfg.model, tok.vocab_size, cfg.data.seq_len, seed=t.seed)
        self.model.load_state_dict(load(run.read_bytes("weights/initial.safetensors")))
        self.model.double()
        if hasattr(self.model, "config"):  # forward-mode AD has no rule for fused CPU attention
            self.model.config._attn_implementation = "eager"
        self.names = [n for n, p in self.model.named_parameters()]  # tied weights appear once
        self.clip = float(cfg.train.deepspeed.get("gradient_clipping", 1.0))
        self.lr = t.lr

    # ---- losses as functions of a parameter dict
    def _per_sample(self, params, b):
        logits = functional_call(self.model, params, (), {"input_ids": b["input_ids"],
                                                          "attention_mask": b["attention_mask"]}).logits[:, :-1]
        labels = b["labels"][:, 1:]
        tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        return tok.sum(1) / (labels != -100).sum(1)

    def _params(self):
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def train(self) -> list[dict]:
        """Forward replay; returns θ_t for t = 0..T (T+1 parameter dicts)."""
        params = self._params()
        thetas = [params]
        for step in range(self.num_steps):
            b = self.data.batch(self.plan.global_batch(step))
            p = {n: v.clone().requires_grad_(True) for n, v in params.items()}
            loss = self._per_sample(p, b).mean()
            grads = torch.autograd.grad(loss, list(p.values()))
            norm = float(torch.sqrt(sum((g * g).sum() for g in grads)))
            kappa = min(1.0, self.clip / (norm + 1e-6)) if self.clip > 0 else 1.0
            params = {n: (v - kappa * self.lr * g).detach() for (n, v), g in zip(params.items(), grads)}
            thetas.append(params)
        return thetas

    def validation_loss(self, params) -> float:
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(params[n])
        return mean_loss(self.model, self.val)

    def values(self, thetas: list[dict], clip: str = "exact", curvature: bool = True) -> dict:
        """value per occurrence: {(step, sample_id): value}."""
        vp = {n: v.clone().requires_grad_(True) for n, v in thetas[-1].items()}
        vb = self.val.batch(np.arange(len(self.val)))
        w = torch.autograd.grad(self._per_sample(vp, vb).mean(), list(vp.values()))
        w = dict(zip(vp.keys(), w))
        out = {}
        ids = self.data.ids.numpy()
        for step in range(self.num_steps - 1, -1, -1):
            idx = self.plan.global_batch(step)
            b = self.data.batch(idx)
            B = len(idx)
            p = {n: v.clone().requires_grad_(True) for n, v in thetas[step].items()}
            per = self._per_sample(p, b)
            gbar = torch.autograd.grad(per.mean(), list(p.values()), create_graph=True)
            norm = torch.sqrt(sum((g * g).sum() for g in gbar)).detach()
            clipped = self.clip > 0 and float(norm) + 1e-6 > self.clip
            kappa = min(1.0, self.clip / (float(norm) + 1e-6)) if self.clip > 0 else 1.0
            eta = kappa * self.lr / B
            # u·w for every sample at once: per-sample directional derivatives along w'
            wp = dict(w)
            if clipped and clip == "exact":  # u = κη(I − ĝĝᵀ)g: project w instead (symmetric)
                ghat = [g.detach() / norm for g in gbar]
                dot = sum((gh * w[n]).sum() for gh, n in zip(ghat, w))
                wp = {n: w[n] - dot * gh for gh, n in zip(ghat, w)}
            _, dirs = jvp(lambda q: self._per_sample(q, b), (thetas[step],), (wp,))
            for z, v in zip(ids[idx], (eta * dirs).tolist()):
                out[(step, int(z))] = v
            if curvature:  # w ← w − κ lr H (I − ĝĝᵀ) w   (frozen κ: w − κ lr H w)
                hv = torch.autograd.grad(gbar, list(p.values()), grad_outputs=[wp[n] for n in p])
                w = {n: (w[n] - kappa * self.lr * h).detach() for n, h in zip(p, hv)}
        return out
