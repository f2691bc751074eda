"""The DeepSpeed engine of one rank (the loss it trains on is rayattr/model/loss.py).

Training (with capture) and counterfactual retraining (`rayattr validate`) both build their
engine here, and train on model/loss.py's micro-batch loss, so a retrain that removes nothing follows the
recorded trajectory bit for bit.
"""

from __future__ import annotations

import torch

from rayattr.config import Config
from rayattr.optim.spec import check_param_groups, resolve_optimizer
from rayattr.train.backend import deepspeed_config


def build_engine(cfg: Config, model: torch.nn.Module, num_steps: int | None = None):
    """deepspeed.initialize on `model` with the run's optimizer (rayattr/optim/spec.py): AdamW
    is always torch.optim.AdamW, so its state (exp_avg_sq, step) reads the same whether it was
    asked for in train.optimizer or in DeepSpeed's block (whose fused Adam needs a GPU build);
    SGD is DeepSpeed's block when given, else torch.optim.SGD at train.lr. ``num_steps``: the
    run's optimizer steps, for a scheduler whose step counts say "auto"."""
    import deepspeed

    ds_cfg = deepspeed_config(cfg, num_steps)
    spec = resolve_optimizer(cfg)
    optimizer = None
    if spec.adamw:
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(spec.beta1, spec.beta2),
                                      eps=spec.eps, weight_decay=spec.weight_decay)
        check_param_groups(optimizer, dict(model.named_modules()))
    elif "optimizer" not in ds_cfg:
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           model_parameters=None if optimizer else model.parameters(),
                                           config=ds_cfg)
    return engine
