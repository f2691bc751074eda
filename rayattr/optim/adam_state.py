"""Adam's state as the capture needs it: the step counter and each captured layer's second
moment v, whether the optimizer holds it whole (ZeRO 0) or partitioned (ZeRO 1/2), turned into
the layer's Preconditioner (docs/method.md §7). The factored P needs only the row and column
sums of v, which each rank forms over its own partition."""

from __future__ import annotations

import torch

from rayattr.capture.precondition import (
    Preconditioner,
    Response,
    adam_preconditioner,
    factors_from_sums,
    fragment_row_col_sums,
    in_gradient_orientation,
    response_factors,
    second_moment_response,
)
from rayattr.optim.spec import OptimizerSpec


def basic_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside the engine (ZeRO wraps it; stage 0 uses it as is)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def adam_step_count(engine) -> int:
    """Adam's step counter: updates applied so far (0 before the first); restored with a checkpoint."""
    opt = basic_optimizer(engine)
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p)
            if state and "step" in state:
                return int(state["step"])
    return 0


def link_partitioned_state(engine, params: list[torch.nn.Parameter]) -> None:
    """ZeRO 1/2 link each parameter to its fragment of the optimizer state only at their next
    step(), and a checkpoint load re-creates the links without it: a resumed rank reading v
    before its first step would find nothing. Link now (DeepSpeed's own lazy hook)."""
    opt = engine.optimizer
    link = getattr(opt, "_lazy_init_hp_params_optimizer_state", None)
    unlinked = any(getattr(getattr(p, "_hp_mapping", None), "optim_fragment", {}) is None for p in params)
    if link is not None and unlinked:
        opt._hp_optimizer_states_linked = False
        link()


def full_exp_avg_sq(engine, param: torch.nn.Parameter) -> torch.Tensor:
    """The whole exp_avg_sq of one parameter, for exact mode (projection=None, small models
    only). Under ZeRO 1/2 this is a collective: every rank must call it for the same
    parameters in the same order."""
    return full_state(engine, param, "exp_avg_sq")


def full_state(engine, param: torch.nn.Parameter, key: str) -> torch.Tensor:
    """The whole Adam state ``key`` ("exp_avg" or "exp_avg_sq") of one parameter, in float32 on
    the CPU; a collective under ZeRO 1/2 (every rank, same parameters, same order)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    full = safe_get_full_optimizer_state(param, key)  # None where the state is not partitioned
    if full is None:
        full = basic_optimizer(engine).state[param][key]
    return full.detach().float().cpu()


def layer_state(engine, module: torch.nn.Module, key: str) -> torch.Tensor:
    """A captured layer's whole Adam state ``key`` as a (d_out, d_in_aug) float64 matrix in G's
    orientation, the bias's as the last column (a collective under ZeRO 1/2)."""
    weight = in_gradient_orientation(module, full_state(engine, module.weight, key)).double()
    if getattr(module, "bias", None) is None:
        return weight
    return torch.cat([weight, full_state(engine, module.bias, key).double().reshape(-1, 1)], dim=1)


def first_moments(engine, layers: list[str]) -> dict[str, torch.Tensor]:
    """{layer: m} as the optimizer holds it now (zeros before the first update): the m_{t−1}
    that :func:`read_responses` recovers the step's mean gradient from. Small models only: the
    whole state of every captured layer is gathered (a collective under ZeRO 1/2)."""
    model = engine.module
    modules = [model.get_submodule(name) for name in layers]
    if adam_step_count(engine) == 0:
        shapes = {n: in_gradient_orientation(m, m.weight).shape for n, m in zip(layers, modules)}
        return {n: torch.zeros(shapes[n][0], shapes[n][1] + int(getattr(m, "bias", None) is not None),
                               dtype=torch.float64) for n, m in zip(layers, modules)}
    link_partitioned_state(engine, [p for m in modules for p in _layer_params(m)])
    return {n: layer_state(engine, m, "exp_avg") for n, m in zip(layers, modules)}


def read_responses(engine, layers: list[str], spec: OptimizerSpec, m_prev: dict[str, torch.Tensor], rank: int,
                   exact: bool = False) -> tuple[dict[str, Response], dict[str, torch.Tensor]]:
    """({layer: Response}, {layer: m_t}) right after step t's update (docs/method.md §7, "v's
    response"): M_t = D_t ⊙ κ_t ḡ_t with D_t = m̂_t ⊙ P_t² / √v̂_t from the whole m_t and v_t,
    and the step's clipped mean gradient recovered from the momentum,
    κ_t ḡ_t = (m_t − β₁ m_{t−1}) / (1 − β₁) (decoupled decay never enters m), so nothing
    needs the gradient itself, which the engine has freed by now. M_t is factored by its
    rank-``rank`` SVD (``exact`` keeps M itself). Small models only: m and v of every captured
    layer are gathered whole (a collective under ZeRO 1/2). The m_t returned is the next
    step's m_{t−1}."""
    model = engine.module
    modules = [model.get_submodule(name) for name in layers]
    link_partitioned_state(engine, [p for m in modules for p in _layer_params(m)])
    k = adam_step_count(engine)
    out, moments = {}, {}
    for name, module in zip(layers, modules):  # the same order on every rank (collective reads)
        m = layer_state(engine, module, "exp_avg")
        v = layer_state(engine, module, "exp_avg_sq")
        mean_grad = (m - spec.beta1 * m_prev[name]) / (1.0 - spec.beta1)
        M = second_moment_response(m, v, mean_grad, k, spec.beta1, spec.beta2, spec.eps)
        out[name] = response_factors(M, rank, keep_full=exact)
        moments[name] = m
    return out, moments


def local_exp_avg_sq(engine, param: torch.nn.Parameter) -> tuple[torch.Tensor | None, int, bool]:
    """(this rank's flat part of a parameter's exp_avg_sq, where it starts in the flattened
    parameter, whether the state is partitioned over ranks). ZeRO 1/2 (and DeepSpeed's bf16
    optimizer) give each rank one contiguous fragment of a parameter, or none; otherwise the
    whole state is local. Reads only: no communication, no copy."""
    if hasattr(param, "_hp_mapping"):
        mapping = param._hp_mapping
        if mapping is None:
            return None, 0, True
        return mapping.get_hp_fragment("exp_avg_sq"), mapping.lp_fragment_address.start, True
    return basic_optimizer(engine).state[param]["exp_avg_sq"], 0, False


def _layer_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]


def layer_second_moment_sums(engine, module: torch.nn.Module, correction: float, eps: float
                             ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(r, c, partitioned): this rank's share of the row and column sums of a layer's floored
    v̂ = max(v / correction, ε²) in G's (d_out, d_in_aug) orientation, bias last (float64).
    Summed over the ranks holding a partition, they are the whole layer's."""
    weight = module.weight
    linear = isinstance(module, torch.nn.Linear)
    d_out, d_in = weight.shape if linear else weight.shape[::-1]
    bias = getattr(module, "bias", None)
    device = weight.device
    r = torch.zeros(d_out, dtype=torch.float64, device=device)
    c = torch.zeros(d_in + (bias is not None), dtype=torch.float64, device=device)
    fragment, start, partitioned = local_exp_avg_sq(engine, weight)
    if fragment is not None:
        rows, cols = fragment_row_col_sums(fragment, start, tuple(weight.shape), correction, eps)
        if not linear:  # a GPT-2 Conv1D stores (d_in, d_out): its rows are G's columns
            rows, cols = cols, rows
        r += rows.to(device)
        c[:d_in] += cols.to(device)
    if bias is not None:
        fragment, start, _ = local_exp_avg_sq(engine, bias)
        if fragment is not None:
            rows, cols = fragment_row_col_sums(fragment, start, tuple(bias.shape), correction, eps)
            r += rows.to(device)
            c[d_in] += cols.to(device)[0]
    return r, c, partitioned


def factored_preconditioners(engine, layers: list[str], spec: OptimizerSpec, step: int
                             ) -> dict[str, Preconditioner]:
    """{layer: factored Preconditioner} from v as the optimizer holds it after ``step`` updates.

    Each rank sums rows and columns over its own partition of exp_avg_sq, and one all-reduce
    of d_out + d_in_aug numbers per layer adds the partitions up (none when v is whole on
    every rank): the state itself never moves (docs/method.md §7). Under ZeRO 1/2 this is a
    collective: every rank calls it at the same steps for the same layers."""
    model = engine.module
    modules = [model.get_submodule(name) for name in layers]
    link_partitioned_state(engine, [p for m in modules for p in _layer_params(m)])
    correction = 1.0 - spec.beta2 ** step
    sums = [layer_second_moment_sums(engine, m, correction, spec.eps) for m in modules]
    flat = torch.cat([torch.cat([r, c]) for r, c, _ in sums])
    if any(partitioned for _, _, partitioned in sums):
        # float32 on the wire, as v itself is: half the bytes, and each rank's float64 sum
        # loses only its last float32 digit
        sent = flat.float()
        torch.distributed.all_reduce(sent, group=getattr(modules[0].weight, "_dp_group", None))
        flat = sent.double()
    flat = flat.cpu()
    out, offset = {}, 0
    for name, (r, c, _) in zip(layers, sums):
        rho, gamma = factors_from_sums(flat[offset:offset + r.numel()],
                                       flat[offset + r.numel():offset + r.numel() + c.numel()])
        offset += r.numel() + c.numel()
        out[name] = Preconditioner(rho, gamma, None, int(step))
    return out


def read_preconditioners(engine, layers: list[str], spec: OptimizerSpec, exact: bool = False
                         ) -> tuple[dict[str, Preconditioner] | None, int]:
    """({layer: Preconditioner}, Adam's step counter of the v read) for the captured layers,
    from v as it stands now: before a step's update, the lagged P; right after it, the step's
    own P_t. Every rank calls it at the same steps (a collective under ZeRO 1/2).

    Before the first update there is no v: (None, 0), and the caller uses u = g for that step
    (docs/method.md §7, "In the pipeline"). ``exact`` (projection=None) reads the whole v for
    its full diagonal: that mode is for small models.
    """
    k = adam_step_count(engine)
    if k == 0:
        return None, 0
    if not exact:
        return factored_preconditioners(engine, layers, spec, k), k
    model = engine.module
    modules = [model.get_submodule(name) for name in layers]
    link_partitioned_state(engine, [p for m in modules for p in _layer_params(m)])
    out = {}
    for name, module in zip(layers, modules):  # the same order on every rank (collective reads)
        weight = in_gradient_orientation(module, full_exp_avg_sq(engine, module.weight))
        bias = full_exp_avg_sq(engine, module.bias) if getattr(module, "bias", None) is not None else None
        out[name] = adam_preconditioner(weight, bias, k, spec.beta2, spec.eps, full=True)
    return out, k
