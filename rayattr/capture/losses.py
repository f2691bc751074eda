"""Per-sample losses whose sum, backpropagated, gives each sample's gradient of its own loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "sum",
    ignore_index: int = -100,
    upcast: bool = True,
) -> torch.Tensor:
    """Cross-entropy per sample: (B, S, V) logits and (B, S) labels -> (B,); (B, C) and (B,) -> (B,).

    No causal shift is applied: for a causal LM pass `logits[:, :-1]` and `labels[:, 1:]`.
    reduction="sum" adds a sample's token losses, "mean" averages over its non-ignored tokens
    (a sample with none gives 0). Tokens labelled `ignore_index` contribute nothing.
    upcast computes the softmax in float32 for half-precision logits, as HF models do.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if logits.dim() < 2 or tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"logits {tuple(logits.shape)} must be labels {tuple(labels.shape)} plus a class dim"
        )
    if upcast and logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    batch = logits.shape[0]
    token_losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none", ignore_index=ignore_index
    ).reshape(batch, -1)
    total = token_losses.sum(dim=1)
    if reduction == "sum":
        return total
    return total / token_counts(labels, ignore_index)


def token_counts(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Each sample's labelled tokens, (B, S) or (B,) labels -> (B,), at least 1 (a sample with
    none then has a mean loss of 0)."""
    return (labels.reshape(labels.shape[0], -1) != ignore_index).sum(dim=1).clamp_min(1)
