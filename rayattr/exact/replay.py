"""A finished run replayed in float64 in one process, step by step, as a differentiable function
of every occurrence's loss weight (docs/method.md §10).

The replay is the run's own arithmetic: its initial weights, its token shards read rank by rank
and micro-batch by micro-batch, the learning rate each step record holds, DeepSpeed's
global-norm clip, and torch's SGD or AdamW (bias correction, decoupled weight decay). One rank's
micro-batch loss is Σ w ℓ / micro_batch and DeepSpeed averages the ranks, so a step's gradient
is Σ_z w_z ℓ_z / |B| (model/loss.py); with every w = 1 that is the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load
from torch.func import functional_call

from rayattr.config import Config
from rayattr.data import TokenizedDataset, load_tokenizer
from rayattr.data.run_data import rank_tokens
from rayattr.errors import RayattrError
from rayattr.model.build import build_model
from rayattr.model.loss import SAMPLE_LOSS_REDUCTION, logits_of
from rayattr.optim.clip import configured_clip
from rayattr.store.layout import INITIAL_WEIGHTS, STATES_DIR, VALIDATION_DATA, state_path, state_step
from rayattr.capture import per_sample_loss

FREEZABLE = ("kappa", "v")
"""What a replay can hold at the run's values: the clip factor κ_t, Adam's second moment v_t."""


class ExactError(RayattrError, ValueError):
    """The run cannot be replayed exactly (not finished, not reproducible, too large)."""


@dataclass
class State:
    """θ_t and, under AdamW, Adam's moments m_t and v_t."""

    params: dict[str, torch.Tensor]
    m: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.params.values(), *self.m.values(), *self.v.values()]

    def leaves(self) -> "State":
        """A detached copy whose tensors require grad: the start of a differentiated segment."""
        def cut(d):
            return {n: x.detach().clone().requires_grad_(True) for n, x in d.items()}
        return State(cut(self.params), cut(self.m), cut(self.v))

    def detached(self) -> "State":
        def cut(d):
            return {n: x.detach() for n, x in d.items()}
        return State(cut(self.params), cut(self.m), cut(self.v))


def sqrt0(x: torch.Tensor) -> torch.Tensor:
    """√x with derivative 0 where x = 0: a coordinate that never had a gradient (an unused
    token's embedding) has v = 0, where √'s derivative is infinite and 0·∞ would be NaN."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


class Replay:
    """A finished run, replayed in float64."""

    def __init__(self, run):
        if run.manifest.get("status") != "done":
            raise ExactError(f"run {run.uri} is not finished (status {run.manifest.get('status')!r})")
        self.run = run
        self.cfg = cfg = Config.from_dict(run.manifest["config"])
        self.records = run.step_records()
        self.num_steps = len(self.records)
        if self.num_steps == 0:
            raise ExactError(f"run {run.uri} has no steps to replay")
        r0 = self.records[0]
        self.optimizer = r0.optimizer
        self.beta1, self.beta2, self.eps, self.wd = r0.beta1, r0.beta2, r0.eps, r0.weight_decay
        self.clip = configured_clip(cfg.train.deepspeed)
        t = cfg.train
        self.ranks = [rank_tokens(run, r) for r in range(t.ranks)]
        self.grad_accum = t.grad_accum
        tok = load_tokenizer(cfg.data.tokenizer)
        self.val = TokenizedDataset(run.read_table(VALIDATION_DATA), tok, cfg.data.seq_len)
        self.model = build_model(cfg.model, tok.vocab_size, cfg.data.seq_len, seed=t.seed)
        self.model.load_state_dict(load(run.read_bytes(INITIAL_WEIGHTS)))
        self.model.double().train()
        if hasattr(self.model, "config"):  # double backward has no rule for fused CPU attention
            self.model.config._attn_implementation = "eager"
        self.initial = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.num_params = sum(p.numel() for p in self.initial.values())

    # ------------------------------------------------------------------ the run's own states

    def anchor_steps(self) -> list[int]:
        """Steps whose state the run kept (train.states_every), in order."""
        return sorted(s for s in (state_step(n) for n in self.run.list(STATES_DIR)) if s is not None)

    def recorded_state(self, step: int) -> State:
        """The run's own state before `step`, in float64."""
        saved = load(self.run.read_bytes(state_path(step)))

        def part(key):
            return {n: saved[f"{key}/{n}"].double() for n in self.initial}

        missing = [n for n in self.initial if f"param/{n}" not in saved]
        if missing:
            raise ExactError(f"{self.run.uri}/{state_path(step)} lacks the weights {missing[:3]}")
        if self.optimizer != "adamw":
            return State(part("param"))
        return State(part("param"), part("exp_avg"), part("exp_avg_sq"))

    # ------------------------------------------------------------------ data

    def batch(self, step: int) -> tuple[dict, np.ndarray]:
        """The step's global batch, rank by rank and micro-batch by micro-batch, and its ids."""
        parts = [rt.micro_batch(step, m) for rt in self.ranks for m in range(self.grad_accum)]
        b = {k: torch.cat([p[k] for p in parts]) for k in ("input_ids", "attention_mask", "labels")}
        return b, torch.cat([p["ids"] for p in parts]).numpy()

    def batch_size(self) -> int:
        return len(self.records[0].sample_ids)

    def per_sample(self, params: dict, b: dict) -> torch.Tensor:
        """Every sample's own loss at `params`, the model/loss.py loss in float64."""
        logits = logits_of(lambda **inputs: functional_call(self.model, params, (), inputs),
                           b["input_ids"], b["attention_mask"])
        return per_sample_loss(logits[:, :-1], b["labels"][:, 1:], reduction=SAMPLE_LOSS_REDUCTION)

    def val_loss(self, params: dict) -> torch.Tensor:
        """The validation loss the values predict the change of: the mean of every sample's loss."""
        return self.per_sample(params, self.val.batch(np.arange(len(self.val)))).mean()

    # ------------------------------------------------------------------ the optimizer

    def initial_state(self) -> State:
        params = {n: p.clone() for n, p in self.initial.items()}
        if self.optimizer != "adamw":
            return State(params)
        return State(params, {n: torch.zeros_like(p) for n, p in params.items()},
                     {n: torch.zeros_like(p) for n, p in params.items()})

    def step(self, state: State, t: int, weights: torch.Tensor, differentiable: bool = True,
             freeze: frozenset = frozenset()) -> tuple[State, float, float]:
        """θ_{t+1} (and m, v) from θ_t with loss weights `weights` over the step's global batch;
        also κ_t and the step's weighted training loss. `differentiable` keeps the graph through
        the gradient (its Hessian) for a metagradient; `freeze` holds κ and/or v at their values."""
        bad = set(freeze) - set(FREEZABLE)
        if bad:
            raise ValueError(f"cannot freeze {sorted(bad)}; choose from {FREEZABLE}")
        rec = self.records[t]
        b, _ = self.batch(t)
        params = state.params
        with torch.enable_grad():
            if not differentiable:
                params = {n: x.detach().requires_grad_(True) for n, x in params.items()}
            per = self.per_sample(params, b)
            loss = (per * weights).sum() / per.shape[0]
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=differentiable)
        g = dict(zip(params, grads))
        norm = torch.sqrt(sum((x * x).sum() for x in grads))
        kappa = torch.clamp(self.clip / (norm + 1e-6), max=1.0) if self.clip > 0 else torch.ones((), dtype=norm.dtype)
        if "kappa" in freeze:
            kappa = kappa.detach()
        lr = rec.lr
        if self.optimizer != "adamw":
            new = State({n: p - lr * kappa * g[n] for n, p in params.items()})
        else:
            b1, b2, k = self.beta1, self.beta2, rec.adam_step or t + 1  # k: Adam's step counter
            new = State({}, {}, {})
            for n, p in params.items():
                gc = g[n] * kappa
                new.m[n] = b1 * state.m[n] + (1 - b1) * gc
                gv = gc.detach() if "v" in freeze else gc
                new.v[n] = b2 * state.v[n] + (1 - b2) * gv * gv
                P = 1 / (sqrt0(new.v[n] / (1 - b2 ** k)) + self.eps)
                new.params[n] = p * (1 - lr * self.wd) - (lr / (1 - b1 ** k)) * new.m[n] * P
        if not differentiable:
            new = new.detached()
        return new, float(kappa.detach()), float(loss.detach())
