"""Sampled-label ("true Fisher") pseudo-losses for the curvature estimate (docs/method.md §3).

Backpropagating a loss against labels drawn from the model's own predictive distribution
gives pseudo-gradients ĝ with E[ĝ ĝᵀ] = the Gauss–Newton matrix of cross-entropy.
"""

from __future__ import annotations

import torch

from .losses import per_sample_loss, token_counts
from .projection import stable_seed


def label_seed(train_seed: int, capture_seed: int, step: int, rank: int, micro: int = 0) -> int:
    """Seed (31 bits) of the label draws of one micro-batch of one rank at one step.

    Distinct for every micro-batch of a step (they are different samples; one seed would
    correlate their labels), and for every `capture.seed`: a run recorded again at another
    capture seed draws other labels as well as another projection, so it is an independent
    estimate of the same trajectory's values (their spread is the estimate's, docs/method.md
    §9). The first micro-batch at capture seed 0 keeps the seed runs recorded before had."""
    if not micro and not capture_seed:
        return hash((train_seed, step, rank)) % 2**31  # ints only: not salted per process
    return stable_seed("labels", train_seed, capture_seed, step, rank, micro) % 2**31


def sample_labels(
    logits: torch.Tensor,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Labels ~ softmax(logits) (detached), shape logits.shape[:-1]; masked positions get ignore_index.

    `generator` must live on the logits' device (torch.multinomial's requirement).
    """
    if logits.dim() < 2:
        raise ValueError(f"logits need a class dimension, got shape {tuple(logits.shape)}")
    probs = torch.softmax(logits.detach().float(), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    labels = torch.multinomial(flat, 1, generator=generator).reshape(logits.shape[:-1])
    if mask is not None:
        mask = torch.as_tensor(mask, device=labels.device)
        if tuple(mask.shape) != tuple(labels.shape):
            raise ValueError(f"mask {tuple(mask.shape)} must match logits' leading dims {tuple(labels.shape)}")
        labels = labels.masked_fill(~mask.bool(), ignore_index)
    return labels


def sampled_label_losses(
    logits: torch.Tensor,
    generator: torch.Generator | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """Per-sample pseudo-losses against sampled labels, (B, C) or (B, S, C) logits -> (B,), whose
    gradients ĝ have E[ĝ ĝᵀ] = the Gauss–Newton matrix of the training loss with `reduction`
    ("sum" or "mean" over a sample's tokens; docs/method.md §3).

    The tokens' pseudo-gradients are independent with mean zero, so the second moment of their
    sum is the sum of theirs: Σ_τ ℓ̂_τ gives Σ_τ G_τ, the summed loss's Gauss–Newton matrix. The
    mean loss's is (1/T) Σ_τ G_τ, which Σ_τ ℓ̂_τ / √T gives; the plain mean Σ_τ ℓ̂_τ / T would
    give it T times too small.
    """
    labels = sample_labels(logits, generator=generator, mask=mask, ignore_index=ignore_index)
    losses = per_sample_loss(logits, labels, reduction=reduction, ignore_index=ignore_index)
    if reduction == "mean":  # Σ_τ ℓ̂_τ / T → Σ_τ ℓ̂_τ / √T
        losses = losses * token_counts(labels, ignore_index).to(losses.dtype).sqrt()
    return losses
