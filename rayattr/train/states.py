"""Training states kept in the run (train.states_every): the full weights and Adam's m and v at
chosen steps, in float32, so that `rayattr exact` can follow the run's own trajectory segment by
segment instead of a float64 replay that a chaotic stretch carries elsewhere (docs/method.md §10)."""

from __future__ import annotations

import torch

from rayattr.optim.adam_state import basic_optimizer
from rayattr.store.layout import state_path

ADAM_STATES = ("exp_avg", "exp_avg_sq")


def full_state(engine) -> dict[str, torch.Tensor]:
    """"param/<name>" (the float32 master weights), and "exp_avg/<name>", "exp_avg_sq/<name>"
    where the optimizer keeps them, each whole. A collective under ZeRO: every rank calls it at
    the same step, for the same parameters in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = basic_optimizer(engine)
    out: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        w = safe_get_full_fp32_param(p)  # None where DeepSpeed keeps no separate master copy
        out[f"param/{name}"] = (p if w is None else w).detach().float().cpu().clone()
        for key in ADAM_STATES:
            s = safe_get_full_optimizer_state(p, key)  # None where the state is not partitioned
            if s is None:
                s = opt.state.get(p, {}).get(key)
            if s is not None:
                out[f"{key}/{name}"] = s.detach().float().cpu().clone()
    return out


def save(engine, run, step: int, rank: int) -> None:
    """The state before `step` into the run's states/ (rank 0 writes; every rank gathers)."""
    from safetensors.torch import save as to_bytes

    state = full_state(engine)
    if rank == 0:
        run.write_bytes(state_path(step), to_bytes(state))
