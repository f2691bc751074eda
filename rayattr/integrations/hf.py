"""RecorderCallback: record a transformers.Trainer run for attribution (rayattr.Recorder).

    run = rayattr.new_run(config)                       # the data and config in the store
    args = TrainingArguments(..., remove_unused_columns=False,
                             deepspeed=ds_config)       # optional: DeepSpeed where installed
    trainer = Trainer(model, args, train_dataset=ds)    # ds items carry a "sample_id"
    trainer.add_callback(RecorderCallback(run, config, trainer=trainer))
    trainer.train()                                     # then: rayattr attribute <run.uri>

Each batch must carry the samples' ids under "sample_id" (the run's data/train.parquet `id`):
the callback takes them out of the model's inputs before its forward, so the model never sees
them. Sources are looked up in the run.

Clipping's coefficient κ (docs/method.md, "Step sizes"): without DeepSpeed the callback does the
Trainer's clipping itself (the same torch clip at args.max_grad_norm) so that it sees the norm.
Under DeepSpeed the engine clips (its gradient_clipping is args.max_grad_norm) and the Recorder
reads the norm right before the engine's step, as in one's own DeepSpeed loop; that engine is
the Trainer's, so the callback is given the Trainer.

Nothing is left behind when training fails: if a step raises (in the callback, its hooks or,
when the callback has the Trainer, anywhere in the Trainer's training_step) the hooks are
removed and args.max_grad_norm is restored before the error goes on. The Recorder's writers
stay open, as after any failed step: readers keep waiting for those ranks.
"""

from __future__ import annotations

import functools

from transformers import TrainerCallback

from rayattr.errors import UsageError
from rayattr.record import Recorder
from rayattr.record.engines import is_deepspeed_engine

SAMPLE_ID = "sample_id"


def uses_deepspeed(args) -> bool:
    return bool(getattr(args, "deepspeed", None))


class RecorderCallback(TrainerCallback):
    """Opens a Recorder step at each optimizer step's start and closes it after the update.

    Args:
        run: the Run or its URI (made by `rayattr.new_run`).
        config: the rayattr Config; None = the run's.
        trainer: the Trainer, needed under DeepSpeed (its engine is trainer.model_wrapped).
        storage_options: fsspec options of the store (S3 credentials, endpoint).
        id_key: the batch key that carries the samples' ids.
    """

    def __init__(self, run, config=None, *, trainer=None, storage_options: dict | None = None,
                 id_key: str = SAMPLE_ID):
        self.run, self.config, self.storage_options, self.id_key = run, config, storage_options, id_key
        self.trainer = trainer
        self.recorder: Recorder | None = None
        self._block = None
        self._hooks = []
        self._max_norm = 0.0
        self._loss_share = 1  # what a forward's loss is multiplied by to be its rank's mean
        self._args = None  # the TrainingArguments whose max_grad_norm the callback took over
        self._unwrap = None  # undoes the wrapping of the Trainer's training_step

    def _restore(self) -> None:
        """Undo what on_train_begin changed (once): hooks, max_grad_norm, training_step."""
        hooks, self._hooks = self._hooks, []
        for h in hooks:
            h.remove()
        if self._args is not None:
            self._args.max_grad_norm, self._args = self._max_norm, None
        unwrap, self._unwrap = self._unwrap, None
        if unwrap is not None:
            unwrap()

    def _restoring(fn):  # noqa: N805 - a decorator of the methods below
        @functools.wraps(fn)
        def call(self, *a, **kw):
            try:
                return fn(self, *a, **kw)
            except BaseException:
                self._restore()
                raise
        return call

    def _wrap_training_step(self) -> None:
        """An error anywhere in a step (forward, backward) restores what the callback changed:
        the Trainer calls no callback when its step raises."""
        trainer = self.trainer
        if trainer is None or not callable(getattr(trainer, "training_step", None)):
            return
        had_own = "training_step" in vars(trainer)
        original = trainer.training_step

        @functools.wraps(original)
        def step(*a, **kw):
            try:
                return original(*a, **kw)
            except BaseException:
                self._restore()
                raise

        def unwrap():
            if had_own:
                trainer.training_step = original
            else:
                vars(trainer).pop("training_step", None)
        trainer.training_step = step
        self._unwrap = unwrap

    @_restoring
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if args.remove_unused_columns:
            raise UsageError("RecorderCallback: set TrainingArguments(remove_unused_columns=False), else the "
                             f"Trainer drops the batches' {self.id_key!r} before the callback sees it")
        if uses_deepspeed(args):  # the engine clips inside engine.step(); the Recorder reads κ there
            self.recorder = Recorder(self._engine(), self.run, self.config, storage_options=self.storage_options)
        else:  # the callback clips, with the Trainer's own setting, so that it sees the norm
            self._max_norm, args.max_grad_norm = float(args.max_grad_norm or 0.0), 0.0
            self._args = args
            self.recorder = Recorder(model, self.run, self.config, optimizer=optimizer,
                                     storage_options=self.storage_options)
        self._average_across = bool(getattr(args, "average_tokens_across_devices", False))
        module = self.recorder.module  # the model itself, inside the engine under DeepSpeed
        self._hooks = [module.register_forward_pre_hook(self._take_ids, with_kwargs=True)]
        if args.gradient_accumulation_steps == 1:  # with accumulation the model's loss is a part of the step's
            self._hooks.append(module.register_forward_hook(self._take_loss))
        self._wrap_training_step()

    def _engine(self):
        """The Trainer's DeepSpeed engine: it exists once trainer.train() has begun."""
        if self.trainer is None:
            raise UsageError("RecorderCallback under DeepSpeed records through the Trainer's engine: "
                             "trainer.add_callback(RecorderCallback(run, config, trainer=trainer))")
        engine = getattr(self.trainer, "model_wrapped", None)
        if not is_deepspeed_engine(engine):
            raise UsageError("RecorderCallback: TrainingArguments.deepspeed is set but the Trainer's model_wrapped "
                             f"is a {type(engine).__name__}, not a DeepSpeed engine")
        return engine

    @_restoring
    def _take_ids(self, module, args, kwargs):
        # the Trainer may hand the model the step's token count over all ranks: its loss is then
        # this rank's share of the global mean, and world_size times it is the rank's mean
        shared = self._average_across and kwargs.get("num_items_in_batch") is not None
        self._loss_share = self.recorder.world_size if shared else 1
        ids = kwargs.pop(self.id_key, None)
        if self._block is not None:
            if ids is None:
                raise UsageError(f"RecorderCallback: a training batch has no {self.id_key!r}: give each "
                                 "dataset item the sample's id in the run's data/train.parquet")
            self.recorder.add_samples(ids)
        return args, kwargs

    @_restoring
    def _take_loss(self, module, args, output):
        loss = getattr(output, "loss", None)
        if self._block is not None and loss is not None:
            self.recorder.add_loss(loss * self._loss_share)  # the step record's; a non-finite one stops the run

    @_restoring
    def on_step_begin(self, args, state, control, **kwargs):
        self._block = self.recorder.step(step=state.global_step, epoch=int(state.epoch or 0))
        self._block.__enter__()

    @_restoring
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._max_norm > 0:
            self.recorder.training.clip_gradients(self._max_norm)

    @_restoring
    def on_step_end(self, args, state, control, **kwargs):
        block, self._block = self._block, None
        block.__exit__(None, None, None)

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()
        self.recorder.finish()
