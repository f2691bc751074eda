"""The tensor work done inside the hooks, free of hook bookkeeping so it can be tested alone.

Shapes: a is (B, T, d_in), ds is (B, T, d_out), mask is (B, T, 1) or None. A sample's
gradient is G = sum_t ds_t [a_t, 1]^T; in projected mode only the factors are projected
(a -> a P_a^T, ds -> ds P_s^T) and G is never formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def project_activations(
    a: torch.Tensor, weight: torch.Tensor, bias_col: torch.Tensor | None, mask: torch.Tensor | None
) -> torch.Tensor:
    """[a, 1] P_a^T as one fused matmul: a P_a[:, :d]^T + P_a[:, d] (no concatenated copy of a)."""
    out = F.linear(a, weight, bias_col)
    return out * mask if mask is not None else out


def project_output_grads(ds: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """ds P_s^T, with masked tokens zeroed (also guards against inf/nan in padded positions)."""
    out = F.linear(ds, weight)
    return out * mask if mask is not None else out


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; skips the call entirely when it already is (even a no-op .to() costs ~10 us)."""
    return t if t.dtype == dtype else t.to(dtype)


def augment(a: torch.Tensor, has_bias: bool, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """[a, 1] (or a alone without bias) in `dtype`, masked tokens zeroed: the exact-mode a-factor."""
    a = cast(a, dtype)
    if has_bias:
        a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
    return a * mask.to(dtype) if mask is not None else a


def per_sample_product(
    ds_factor: torch.Tensor, a_factor: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> torch.Tensor:
    """scale * sum_t ds_t a_t^T per sample, accumulated in `dtype`, flattened row-major to (B, rows*cols).

    On CUDA, half-precision factors go straight into a bmm with float32 output (fp32
    accumulation, no upcast copies); elsewhere the factors are upcast first.
    """
    lhs = ds_factor.transpose(1, 2)
    if (
        ds_factor.is_cuda
        and dtype == torch.float32
        and ds_factor.dtype in (torch.float16, torch.bfloat16)
        and a_factor.dtype == ds_factor.dtype
    ):
        g = torch.bmm(lhs, a_factor, out_dtype=torch.float32)
    else:
        g = torch.bmm(cast(lhs, dtype), cast(a_factor, dtype))
    if scale != 1.0:
        g.mul_(scale)
    return g.reshape(g.shape[0], -1)


def scale_projections(
    weight: torch.Tensor, bias_col: torch.Tensor | None, p_s: torch.Tensor, rho: torch.Tensor, gamma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The projections of an update row: P_a's columns scaled by γ (the bias column's by its
    last entry), P_s's by ρ, so that (a ⊙ γ) P_aᵀ and (ds ⊙ ρ) P_sᵀ cost what the raw
    projections cost (docs/method.md §7). ρ, γ are cast to the matrices' device and dtype."""
    gamma = gamma.to(device=weight.device, dtype=weight.dtype)
    rho = rho.to(device=p_s.device, dtype=p_s.dtype)
    d = weight.shape[1]
    return weight * gamma[:d], bias_col * gamma[d] if bias_col is not None else None, p_s * rho


def update_row(
    a: torch.Tensor, ds: torch.Tensor, mask: torch.Tensor | None,
    scaled: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor], dtype: torch.dtype, scale: float = 1.0
) -> torch.Tensor:
    """A sample's projected update row Σ_t (ds_t ⊙ ρ) P_sᵀ ⊗ ([a_t, 1] ⊙ γ) P_aᵀ from the raw
    factors a (B, T, d_in) and ds (B, T, d_out) and the ρ/γ-scaled projections."""
    weight, bias_col, p_s = scaled
    return per_sample_product(project_output_grads(ds, p_s, mask), project_activations(a, weight, bias_col, mask),
                              dtype, scale)
