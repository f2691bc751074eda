"""Global-norm gradient clipping as the attribution sees it: the norm before the step and the
factor κ_t the step applied (docs/method.md, "Step sizes")."""

from __future__ import annotations

import math

import torch


DEEPSPEED_DEFAULT_CLIP = 1.0
"""The global-norm threshold DeepSpeed clips at when its config names none."""


def configured_clip(deepspeed: dict) -> float:
    """The threshold c a run with this DeepSpeed config clipped at (0: no clipping)."""
    return float(deepspeed.get("gradient_clipping", DEEPSPEED_DEFAULT_CLIP) or 0.0)


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
