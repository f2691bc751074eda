"""The preconditioner a step's update will actually use, before that step's hooked pass.

Adam's update at step t divides by √v̂_t, and v_t already contains the step's own gradient:
v_t = β₂ v_{t-1} + (1 - β₂)(κ_t ḡ_t)². The capture hooks project each sample's update row
during the backward, before ḡ_t exists, so reading v as it stands gives P_{t-1}. Wherever a
gradient grows faster than v remembers it -- the first steps, attention's query/key weights
early in training, a token seen for the first time -- P_{t-1} overstates P_t by orders of
magnitude and single occurrences dominate the values (docs/method.md §7, "Lagged or
lookahead P"). The lookahead runs the step's micro-batches once more without hooks, on
detached copies of the weights (DeepSpeed's gradient hooks never see it), averages the
gradient over ranks, clips it as DeepSpeed will, and forms v_t from it: one extra forward and
backward per step, for P_t exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from rayattr.train.engine import micro_batch_loss
from rayattr.capture.precondition import Preconditioner, adam_preconditioner, in_gradient_orientation
from rayattr.optimizer import OptimizerSpec
from rayattr.train.adam_state import adam_step_count, full_exp_avg_sq, link_partitioned_state


def step_mean_gradient(model: torch.nn.Module, micro_batches: Iterable[tuple], grad_accum: int,
                       world_size: int) -> dict[str, torch.Tensor]:
    """ḡ_t per parameter name in float64: the mean-loss gradient of the step's micro-batches
    (input_ids, attention_mask, labels) on this rank, averaged over ranks as DeepSpeed does.
    Every rank must call it (an all-reduce when world_size > 1)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    copies = {n: p.detach().clone().requires_grad_() for n, p in named}
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named}
    def forward(**inputs):  # the model on the detached copies: DeepSpeed's hooks never see it
        return torch.func.functional_call(model, copies, (), inputs)

    for ids, mask, labels in micro_batches:
        # the loss training backpropagates, divided by the accumulation steps as DeepSpeed does
        loss = micro_batch_loss(forward, ids, mask, labels)
        grads = torch.autograd.grad(loss / grad_accum, list(copies.values()), allow_unused=True)
        for (n, _), g in zip(named, grads):
            if g is not None:
                total[n] += g.double()
    if world_size > 1:
        flat = torch.cat([g.reshape(-1) for g in total.values()])
        torch.distributed.all_reduce(flat)
        flat /= world_size
        offset = 0
        for n, g in total.items():
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    return total


def clip_factor(grads: dict[str, torch.Tensor], clipping: float) -> float:
    """κ_t as DeepSpeed applies it: clipping / (‖ḡ‖ + 1e-6) when that is below 1, else 1."""
    if clipping <= 0:
        return 1.0
    norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads.values())))
    return min(1.0, clipping / (norm + 1e-6))


def lookahead_preconditioners(engine, layers: list[str], spec: OptimizerSpec, micro_batches: Iterable[tuple],
                              grad_accum: int, world_size: int, exact: bool = False
                              ) -> tuple[dict[str, Preconditioner], int]:
    """({layer: Preconditioner from v_t}, t + 1: Adam's counter after this step) for the captured
    layers. Collective: every rank calls it at every step, with its own micro-batches."""
    model = engine.module
    grads = step_mean_gradient(model, micro_batches, grad_accum, world_size)
    kappa = clip_factor(grads, float(engine.gradient_clipping() or 0.0))
    k = adam_step_count(engine)
    modules = {name: model.get_submodule(name) for name in layers}
    names = {id(p): n for n, p in model.named_parameters()}
    if k:
        link_partitioned_state(engine, [p for m in modules.values() for p in (m.weight, getattr(m, "bias", None))
                                        if p is not None])

    def v_after(param: torch.nn.Parameter) -> torch.Tensor:
        g = kappa * grads[names[id(param)]]
        before = full_exp_avg_sq(engine, param).double() if k else torch.zeros_like(g)
        return spec.beta2 * before + (1 - spec.beta2) * g * g

    out = {}
    for name in layers:  # the same order on every rank (collective reads)
        module = modules[name]
        weight = in_gradient_orientation(module, v_after(module.weight))
        bias = v_after(module.bias) if getattr(module, "bias", None) is not None else None
        out[name] = adam_preconditioner(weight, bias, k + 1, spec.beta2, spec.eps, full=exact)
    return out, k + 1
