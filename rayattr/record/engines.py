"""What the Recorder asks the training engine at each step: the learning rate, the fp16 loss
scale, whether the step was applied and its clip coefficient κ_t (docs/method.md, "Step sizes").

A DeepSpeed engine answers for itself; a plain torch model with its optimizer (the HF Trainer
without DeepSpeed) is wrapped so the same questions have answers.
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace
from typing import Iterator

import torch

from rayattr.errors import UsageError
from rayattr.optim.clip import clip_coefficient, grad_norm_before_step


def is_deepspeed_engine(obj) -> bool:
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:
        return False
    return isinstance(obj, DeepSpeedEngine)


class DeepSpeedSteps:
    """A DeepSpeed engine's side of a recorded step."""

    def __init__(self, engine):
        self.engine = engine
        self.module = engine.module
        self.optimizer_owner = engine  # what optim/adam_state.py reads Adam's state from
        self._norm: float | None = None

    def lr(self) -> float | None:
        lrs = self.engine.get_lr()
        return float(lrs[0]) if lrs else None

    def loss_scale(self) -> float:
        """The fp16 dynamic loss scale multiplying the backpropagated loss (1 otherwise)."""
        if not self.engine.fp16_enabled():
            return 1.0
        opt = self.engine.optimizer
        return float(getattr(opt, "cur_scale", getattr(opt, "loss_scale", 1.0)))

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """For the block of one step: take the gradient norm just before the boundary
        engine.step() (ZeRO 0 clips without keeping it), by wrapping that engine's step."""
        engine, original = self.engine, self.engine.step
        self._norm = None

        def step(*args, **kwargs):
            if engine.is_gradient_accumulation_boundary():
                self._norm = grad_norm_before_step(engine)
            return original(*args, **kwargs)

        engine.step = step
        try:
            yield
        finally:
            del engine.step  # the class's own step again

    def applied(self) -> bool:
        return bool(self.engine.was_step_applied())

    def clip(self) -> float:
        return clip_coefficient(self.engine, self._norm)


class TorchSteps:
    """A plain torch model and optimizer (no loss scaling; every step applied). Clipping is
    recorded by clipping through `clip_gradients`, which keeps the norm it saw."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"a plain torch model needs its torch.optim optimizer, got {type(optimizer).__name__}")
        self.module = model
        self.optimizer = optimizer
        self.optimizer_owner = SimpleNamespace(module=model, optimizer=optimizer)
        self._clip = 1.0

    def lr(self) -> float | None:
        return float(self.optimizer.param_groups[0]["lr"])

    def loss_scale(self) -> float:
        return 1.0

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        self._clip = 1.0
        yield

    def clip_gradients(self, max_norm: float) -> float:
        """torch's global-norm clipping; κ = min(1, c / (‖g‖ + 1e-6)) as torch applies it."""
        norm = float(torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.grad is not None],
                                                    max_norm))
        self._clip = min(1.0, max_norm / (norm + 1e-6)) if math.isfinite(norm) and max_norm > 0 else 1.0
        return norm

    def applied(self) -> bool:
        return True

    def clip(self) -> float:
        return self._clip


def steps_of(engine, optimizer=None):
    """The adapter for a DeepSpeed engine, or for a torch model given with its optimizer."""
    if is_deepspeed_engine(engine):
        if optimizer is not None:
            raise UsageError("a DeepSpeed engine brings its own optimizer: do not pass optimizer=")
        if engine.zero_optimization_stage() == 3:
            raise UsageError("a DeepSpeed engine with ZeRO stage 3 is not supported: it partitions the parameters, "
                             "and rayattr captures each layer's whole weight gradient; use stage 0, 1 or 2")
        return DeepSpeedSteps(engine)
    if isinstance(engine, torch.nn.Module):
        if optimizer is None:
            raise UsageError("Recorder(model, ...): a plain torch model needs optimizer= (or pass the DeepSpeed engine)")
        return TorchSteps(engine, optimizer)
    raise TypeError(f"Recorder needs a DeepSpeed engine or a torch.nn.Module, got {type(engine).__name__}")
