"""The loss training and attribution share: a sample's own loss, the logits it is read from,
and the micro-batch loss a rank backpropagates (training, and a counterfactual retrain)."""

from __future__ import annotations

import torch

from rayattr.capture import per_sample_loss

# A sample's loss is the mean cross-entropy over its tokens, as in HF causal LMs. Training
# gradients, sampled-label pseudo-gradients and test gradients all use it: with a summed
# pseudo-loss the curvature came out seq_len^2 times too large and the recursion diverged.
SAMPLE_LOSS_REDUCTION = "mean"


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits from a HuggingFace model (output object) or a factory model (plain tensor)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return out if isinstance(out, torch.Tensor) else out.logits


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
