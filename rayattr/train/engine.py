"""The DeepSpeed engine of one rank and the loss it trains on.

Training (with capture) and counterfactual retraining (`rayattr validate`) both build their
engine and their micro-batch loss here, so a retrain that removes nothing follows the
recorded trajectory bit for bit.
"""

from __future__ import annotations

import math

import torch

from rayattr.capture import per_sample_loss
from rayattr.config import Config
from rayattr.optimizer import check_param_groups, resolve_optimizer
from rayattr.train.backend import deepspeed_config
from rayattr.train.model import SAMPLE_LOSS_REDUCTION, logits_of


def build_engine(cfg: Config, model: torch.nn.Module, num_steps: int | None = None):
    """deepspeed.initialize on `model` with the run's optimizer (rayattr/optimizer.py): AdamW
    is always torch.optim.AdamW, so its state (exp_avg_sq, step) reads the same whether it was
    asked for in train.optimizer or in DeepSpeed's block (whose fused Adam needs a GPU build);
    SGD is DeepSpeed's block when given, else torch.optim.SGD at train.lr. ``num_steps``: the
    run's optimizer steps, for a scheduler whose step counts say "auto"."""
    import deepspeed

    ds_cfg = deepspeed_config(cfg, num_steps)
    spec = resolve_optimizer(cfg)
    optimizer = None
    if spec.adamw:
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(spec.beta1, spec.beta2),
                                      eps=spec.eps, weight_decay=spec.weight_decay)
        check_param_groups(optimizer, dict(model.named_modules()))
    elif "optimizer" not in ds_cfg:
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           model_parameters=None if optimizer else model.parameters(),
                                           config=ds_cfg)
    return engine


def micro_batch_loss(engine, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """The loss one micro-batch backpropagates: Σ_i w_i ℓ_i / micro_batch, ℓ_i a sample's own loss.
    `engine`: the DeepSpeed engine, or any callable model.

    Weights are 1 in training. A counterfactual retrain gives removed occurrences weight 0
    and keeps the divisor, so every other sample keeps its step size lr/|B| (docs/method.md,
    "Validation").
    """
    logits = logits_of(engine, input_ids, attention_mask)
    per_sample = per_sample_loss(logits[:, :-1].float(), labels[:, 1:], reduction=SAMPLE_LOSS_REDUCTION)
    if weights is None:
        weights = torch.ones_like(per_sample)
    return (per_sample * weights.to(per_sample)).sum() / per_sample.shape[0]


def grad_norm_before_step(engine) -> float | None:
    """Global gradient norm at an accumulation boundary, before engine.step(), where only the
    module holds the reduced gradients (ZeRO stage 0); None where the optimizer reports it."""
    if engine.zero_optimization_stage() > 0 or engine.fp16_enabled() or engine.bfloat16_enabled():
        return None
    sq = [p.grad.detach().double().pow(2).sum() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


def clip_coefficient(engine, norm_before_step: float | None) -> float:
    """κ_t: the factor global-norm gradient clipping applied at the step just taken (1 when it
    did not clip). DeepSpeed clips at `gradient_clipping` (default 1.0 in DeepSpeed itself) with
    κ = c / (‖ḡ‖ + 1e-6) when that is below 1; the per-sample step size is κ_t·lr_t/|B|
    (docs/method.md, "Step sizes")."""
    c = float(engine.gradient_clipping() or 0.0)
    norm = norm_before_step if norm_before_step is not None else engine.get_global_grad_norm()
    if c <= 0 or norm is None:
        return 1.0
    norm = float(norm.item() if hasattr(norm, "item") else norm)
    if not math.isfinite(norm):
        return 1.0  # an overflowed step is skipped, and its eta is 0 anyway
    return min(1.0, c / (norm + 1e-6))
