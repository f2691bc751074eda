"""No leaks on failure: when a step raises, RecorderCallback removes its hooks and gives the
Trainer back its max_grad_norm (the Trainer calls no callback after a failed step)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
from rayattr.integrations.hf import RecorderCallback  # noqa: E402


class Boom(RuntimeError):
    pass


class FailingRecorder:
    module = None

    def step(self, **kw):
        raise Boom("the store is gone")


def started(trainer=None):
    """A callback in the state on_train_begin leaves it in (without DeepSpeed)."""
    model = torch.nn.Linear(2, 2)
    args = SimpleNamespace(max_grad_norm=0.0)
    cb = RecorderCallback("/nowhere", None, trainer=trainer)
    cb.recorder, cb._max_norm, cb._args = FailingRecorder(), 1.0, args
    cb._hooks = [model.register_forward_pre_hook(cb._take_ids, with_kwargs=True),
                 model.register_forward_hook(cb._take_loss)]
    cb._wrap_training_step()
    return cb, model, args


def test_a_failing_callback_step_restores_hooks_and_max_grad_norm():
    cb, model, args = started()
    with pytest.raises(Boom):
        cb.on_step_begin(args, SimpleNamespace(global_step=0, epoch=0), None)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert args.max_grad_norm == 1.0


def test_a_step_failing_inside_the_trainer_restores_them_too():
    def training_step(*a, **kw):
        raise Boom("CUDA out of memory")

    trainer = SimpleNamespace(training_step=training_step)
    cb, model, args = started(trainer)
    with pytest.raises(Boom):
        trainer.training_step(None, {})
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert args.max_grad_norm == 1.0
    assert trainer.training_step is training_step  # the Trainer is left as it was

