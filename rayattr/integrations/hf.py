"""RecorderCallback: record a transformers.Trainer run for attribution (rayattr.Recorder).

    run = rayattr.new_run(config)                       # the data and config in the store
    args = TrainingArguments(..., remove_unused_columns=False)
    trainer = Trainer(model, args, train_dataset=ds,    # ds items carry a "sample_id"
                      callbacks=[RecorderCallback(run, config)])
    trainer.train()                                     # then: rayattr attribute <run.uri>

Each batch must carry the samples' ids under "sample_id" (the run's data/train.parquet `id`):
the callback takes them out of the model's inputs before its forward, so the model never sees
them. Sources are looked up in the run. The callback does the Trainer's gradient clipping
itself (the same torch clip at args.max_grad_norm) to record its coefficient κ
(docs/method.md, "Step sizes").
"""

from __future__ import annotations

from transformers import TrainerCallback

from rayattr.record import Recorder

SAMPLE_ID = "sample_id"


class RecorderCallback(TrainerCallback):
    """Opens a Recorder step at each optimizer step's start and closes it after the update."""

    def __init__(self, run, config=None, *, storage_options: dict | None = None, id_key: str = SAMPLE_ID):
        self.run, self.config, self.storage_options, self.id_key = run, config, storage_options, id_key
        self.recorder: Recorder | None = None
        self._block = None
        self._hooks = []
        self._max_norm = 0.0

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if args.remove_unused_columns:
            raise ValueError("RecorderCallback: set TrainingArguments(remove_unused_columns=False), else the "
                             f"Trainer drops the batches' {self.id_key!r} before the callback sees it")
        if getattr(args, "deepspeed", None):
            raise ValueError("RecorderCallback does not record a Trainer under DeepSpeed yet; "
                             "use rayattr.Recorder in a DeepSpeed loop (jobs/examples/ray_train_deepspeed.py)")
        # the callback clips, with the Trainer's own setting, so that it sees the norm
        self._max_norm, args.max_grad_norm = float(args.max_grad_norm or 0.0), 0.0
        self._args = args
        self.recorder = Recorder(model, self.run, self.config, optimizer=optimizer,
                                 storage_options=self.storage_options)
        if self.recorder.optimizer.adamw and self.recorder.cfg.capture.preconditioner == "lookahead":
            # a callback sees no batch before the step's forwards, so it cannot run the lookahead pass
            raise ValueError("RecorderCallback records AdamW with capture.preconditioner: lagged (docs/method.md §7); "
                             "set it in the run's config")
        self._hooks = [model.register_forward_pre_hook(self._take_ids, with_kwargs=True)]
        if args.gradient_accumulation_steps == 1:  # with accumulation the model's loss is a part of the step's
            self._hooks.append(model.register_forward_hook(self._take_loss))

    def _take_ids(self, module, args, kwargs):
        ids = kwargs.pop(self.id_key, None)
        if self._block is not None:
            if ids is None:
                raise ValueError(f"RecorderCallback: a training batch has no {self.id_key!r}: give each "
                                 "dataset item the sample's id in the run's data/train.parquet")
            self.recorder.add_samples(ids)
        return args, kwargs

    def _take_loss(self, module, args, output):
        loss = getattr(output, "loss", None)
        if self._block is not None and loss is not None:
            self.recorder.add_loss(loss)  # the step record's loss; a non-finite one stops the run

    def on_step_begin(self, args, state, control, **kwargs):
        self._block = self.recorder.step(step=state.global_step, epoch=int(state.epoch or 0))
        self._block.__enter__()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._max_norm > 0:
            self.recorder.training.clip_gradients(self._max_norm)

    def on_step_end(self, args, state, control, **kwargs):
        block, self._block = self._block, None
        block.__exit__(None, None, None)

    def on_train_end(self, args, state, control, **kwargs):
        for h in self._hooks:
            h.remove()
        args.max_grad_norm = self._max_norm
        self.recorder.finish()
