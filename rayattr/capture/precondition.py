"""Adam's preconditioner P = 1/(√v̂ + ε) for one layer, in the form the hooks apply it
(docs/method.md §7).

P is diagonal in parameter space but not in the projected space, so it must be applied to
the gradient before projection. A per-sample gradient is G = Σ_s δ_s [a_s, 1]ᵀ; with v̂
factored Adafactor-style, v̂_ij ≈ r_i c_j / Σr (r, c the row and column sums), the scaled
gradient is P ⊙ G ≈ Σ_s (δ_s ⊙ ρ)([a_s, 1] ⊙ γ)ᵀ with ρ_i = (Σr)^¼/√r_i, γ_j = (Σr)^¼/√c_j:
scaling the two factors is the same as scaling the columns of the projection matrices, so
the update row costs one more pair of projections. Exact mode (no projection) uses the full
diagonal instead.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class Preconditioner:
    """One layer's preconditioner over its (d_out, d_in_aug) gradient (bias = last column)."""

    rho: torch.Tensor
    """(d_out,) factor on the output-gradient side."""
    gamma: torch.Tensor
    """(d_in_aug,) factor on the activation side, the bias column's last."""
    full: torch.Tensor | None = None
    """(d_out, d_in_aug) the exact diagonal 1/(√v̂ + ε); needed in exact mode (projection=None)."""
    step: int | None = None
    """Adam's step counter of the v it was made from (recorded with the steps that use it)."""


def second_moment_matrix(exp_avg_sq: torch.Tensor, exp_avg_sq_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The (d_out, d_in_aug) v of a layer: weight state (d_out, d_in) with the bias state as last column.

    Pass the weight state in G's orientation (transpose a GPT-2 Conv1D's (d_in, d_out) state).
    """
    v = exp_avg_sq.detach().to(torch.float64)
    if exp_avg_sq_bias is None:
        return v
    return torch.cat([v, exp_avg_sq_bias.detach().to(torch.float64).reshape(-1, 1)], dim=1)


def factor_second_moment(v_hat: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ρ, γ) with ρ_i γ_j ≈ 1/√v̂_ij from the row and column sums of v̂ (Adafactor's factoring).

    ε enters as a floor: each entry counts as at least ε² in the sums, so a coordinate whose
    v̂ is below ε² is treated as if it were ε², where 1/(√v̂ + ε) is within 2× of 1/ε. That
    keeps ρ, γ finite for rows or columns that never had a gradient (e.g. constant inputs).
    """
    floored = v_hat.to(torch.float64).clamp_min(eps * eps)
    return factors_from_sums(floored.sum(1), floored.sum(0))


def factors_from_sums(r: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ρ, γ) = ((Σr)^¼/√r, (Σr)^¼/√c) from the floored v̂'s row sums r and column sums c."""
    scale = r.sum() ** 0.25
    return scale / r.sqrt(), scale / c.sqrt()


def fragment_row_col_sums(fragment: torch.Tensor, start: int, shape: tuple[int, ...], correction: float,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column sums (float64) of max(v / correction, ε²) over the entries of a state of
    ``shape`` (2-D, or 1-D: one column) that one contiguous flat fragment holds: the part of a
    ZeRO partition that falls in one parameter, entries [start, start + numel) of its
    row-major flattening. Entries outside the fragment count 0, so the ranks' sums add up to
    the whole state's (the floor included: every entry lies in exactly one fragment).

    This runs on every rank at every step, so the entries stay in float32, as the state is: a
    float64 copy of the state cost as much as the optimizer's step itself. Only the sums of a
    row or a column (float32 cascade sums, relative error about 1e-7) are carried in float64."""
    rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (shape[0], 1)
    r = torch.zeros(rows, dtype=torch.float64, device=fragment.device)
    c = torch.zeros(cols, dtype=torch.float64, device=fragment.device)
    floor = eps * eps
    single = fragment.dtype != torch.float64 and floor >= torch.finfo(torch.float32).tiny  # ε² must not flush to 0
    v = (fragment.detach().reshape(-1).to(torch.float32 if single else torch.float64) / correction).clamp_min_(floor)
    end = start + v.numel()
    # the fragment is a partial first row, whole rows, then a partial last row
    head = min(end, -(-start // cols) * cols) - start
    whole = (end - start - head) // cols * cols
    pieces = [(start, v[:head]), (start + head, v[head:head + whole]), (start + head + whole, v[head + whole:])]
    for at, piece in pieces:
        if piece.numel() == 0:
            continue
        row, col = divmod(at, cols)
        if col == 0 and piece.numel() % cols == 0:  # whole rows: a view, no copy
            block = piece.view(-1, cols)
            r[row:row + block.shape[0]] += block.sum(1)
            c += block.sum(0)
        else:  # within one row
            r[row] += piece.sum()
            c[col:col + piece.numel()] += piece
    return r, c


def adam_preconditioner(
    exp_avg_sq: torch.Tensor,
    exp_avg_sq_bias: torch.Tensor | None = None,
    step: int = 1,
    beta2: float = 0.999,
    eps: float = 1e-8,
    full: bool = False,
) -> Preconditioner:
    """A layer's Preconditioner from Adam's exp_avg_sq state after ``step`` optimizer steps.

    v is bias-corrected first, v̂ = v / (1 - β₂^step), as Adam divides by √v̂; ``full`` also
    keeps the exact diagonal 1/(√v̂ + ε) for exact-mode capture.
    """
    if step < 1:
        raise ValueError(f"Adam's step counter must be >= 1 (a v exists only after a step), got {step}")
    v_hat = second_moment_matrix(exp_avg_sq, exp_avg_sq_bias) / (1.0 - beta2 ** step)
    rho, gamma = factor_second_moment(v_hat, eps)
    diagonal = 1.0 / (v_hat.sqrt() + eps) if full else None
    return Preconditioner(rho, gamma, diagonal, int(step))


def in_gradient_orientation(module: nn.Module, weight_state: torch.Tensor) -> torch.Tensor:
    """A weight-shaped state in G's (d_out, d_in) orientation: a GPT-2 Conv1D stores (d_in, d_out)."""
    return weight_state if isinstance(module, nn.Linear) else weight_state.t()


def module_preconditioner(module: nn.Module, optimizer: torch.optim.Optimizer, full: bool = False) -> Preconditioner:
    """The Preconditioner of a Linear / Conv1D module trained by a torch Adam/AdamW optimizer
    whose whole state is local (not for ZeRO-partitioned states)."""
    group = next(g for g in optimizer.param_groups if any(p is module.weight for p in g["params"]))
    state = optimizer.state[module.weight]
    v = in_gradient_orientation(module, state["exp_avg_sq"])
    bias = optimizer.state[module.bias]["exp_avg_sq"] if getattr(module, "bias", None) is not None else None
    return adam_preconditioner(v, bias, int(state["step"]), group["betas"][1], group["eps"], full)


def second_moment_response(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, mean_grad: torch.Tensor,
                           step: int, beta1: float, beta2: float, eps: float) -> torch.Tensor:
    """M_t = D_t ⊙ ḡ_t with D_t = m̂_t ⊙ P_t² / √v̂_t, from Adam's state after ``step`` steps and
    the step's mean gradient ḡ_t (all (d_out, d_in_aug), float64). A sample's second-moment
    response row is y = M_t ⊙ g (docs/method.md §7, "v's response"). Coordinates with v̂ = 0
    (never a gradient) have no response."""
    if step < 1:
        raise ValueError(f"Adam's step counter must be >= 1 (a v exists only after a step), got {step}")
    m_hat = exp_avg.to(torch.float64) / (1.0 - beta1 ** step)
    root = (exp_avg_sq.to(torch.float64) / (1.0 - beta2 ** step)).sqrt()
    D = m_hat / ((root + eps) ** 2 * root.clamp_min(torch.finfo(torch.float64).tiny))
    return torch.where(root > 0, D, torch.zeros_like(D)) * mean_grad.to(torch.float64)


def module_second_moment_response(module: nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """:func:`second_moment_response` of a Linear / Conv1D module right after ``optimizer.step()``
    (its .grad still the step's mean gradient), for a torch Adam/AdamW whose state is local."""
    group = next(g for g in optimizer.param_groups if any(p is module.weight for p in g["params"]))
    params = [module.weight] + ([module.bias] if getattr(module, "bias", None) is not None else [])

    def joined(get) -> torch.Tensor:  # (d_out, d_in_aug): the weight in G's orientation, bias last
        w = in_gradient_orientation(module, get(params[0])).detach()
        return torch.cat([w, get(params[1]).detach().reshape(-1, 1)], 1) if len(params) > 1 else w

    state = optimizer.state[module.weight]
    beta1, beta2 = group["betas"]
    return second_moment_response(joined(lambda p: optimizer.state[p]["exp_avg"]),
                                  joined(lambda p: optimizer.state[p]["exp_avg_sq"]),
                                  joined(lambda p: p.grad), int(state["step"]), beta1, beta2, group["eps"])


@dataclasses.dataclass(frozen=True)
class Response:
    """One layer's second-moment response M_t = D_t ⊙ ḡ_t in the form the capture applies it
    (docs/method.md §7, "v's response"): a sample's row is y = M_t ⊙ G. M_t is signed and not
    of rank one, so unlike P it is factored by its singular value decomposition,
    M ≈ Σ_k x_k y_kᵀ, and Π(M ⊙ δ aᵀ) = Σ_k Π_s(x_k ⊙ δ) ⊗ Π_a(y_k ⊙ a): k update-row
    projections, exact when k reaches M's rank. Exact mode (projection=None) uses M itself."""

    x: torch.Tensor
    """(k, d_out) the left factors, singular values folded in."""
    y: torch.Tensor
    """(k, d_in_aug) the right factors, the bias column's last."""
    full: torch.Tensor | None = None
    """(d_out, d_in_aug) M itself; needed in exact mode."""


def response_factors(M: torch.Tensor, rank: int, keep_full: bool = False) -> Response:
    """The rank-``rank`` truncated SVD of a layer's M (float64): the best rank-k approximation in
    Frobenius norm (Eckart–Young), all of M when rank ≥ min(d_out, d_in_aug)."""
    if rank < 1:
        raise ValueError(f"the response's rank must be >= 1, got {rank}")
    M = M.detach().to(torch.float64)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    k = min(int(rank), S.numel())
    return Response((U[:, :k] * S[:k]).T.contiguous(), Vh[:k].contiguous(), M if keep_full else None)

