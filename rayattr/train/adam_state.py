"""Adam's state as the capture needs it: the step counter and each captured layer's second
moment v, whether the optimizer holds it whole (ZeRO 0) or partitioned (ZeRO 1/2), turned into
the layer's Preconditioner (docs/method.md §7)."""

from __future__ import annotations

import torch

from rayattr.capture.precondition import Preconditioner, adam_preconditioner, in_gradient_orientation
from rayattr.optimizer import OptimizerSpec


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
    """The whole exp_avg_sq of one parameter. Under ZeRO 1/2 this is a collective: every rank
    must call it for the same parameters in the same order."""
    from deepspeed.utils import safe_get_full_optimizer_state

    full = safe_get_full_optimizer_state(param, "exp_avg_sq")  # None where the state is not partitioned
    if full is None:
        full = basic_optimizer(engine).state[param]["exp_avg_sq"]
    return full.detach().float().cpu()


def read_preconditioners(engine, layers: list[str], spec: OptimizerSpec, exact: bool = False
                         ) -> tuple[dict[str, Preconditioner] | None, int]:
    """({layer: Preconditioner}, Adam's step counter of the v read) for the captured layers.

    Before the first update there is no v: (None, 0), and the caller uses u = g for that step
    (docs/method.md §7, "In the pipeline").
    """
    k = adam_step_count(engine)
    if k == 0:
        return None, 0
    model = engine.module
    modules = [model.get_submodule(name) for name in layers]
    link_partitioned_state(engine, [p for m in modules for p in (m.weight, getattr(m, "bias", None)) if p is not None])
    out = {}
    for name in layers:  # the same order on every rank (collective reads)
        module = model.get_submodule(name)
        weight = in_gradient_orientation(module, full_exp_avg_sq(engine, module.weight))
        bias = full_exp_avg_sq(engine, module.bias) if getattr(module, "bias", None) is not None else None
        out[name] = adam_preconditioner(weight, bias, k, spec.beta2, spec.eps, full=exact)
    return out, k
