"""RankWorker: one DeepSpeed training rank (a Ray Train worker), recording through the Recorder.

Per optimizer step a rank runs its micro-batches through the DeepSpeed engine inside a
`Recorder.step` block (rayattr/record/recorder.py): the same code path a user's own training
loop takes. The rank adds what only the built-in job has: its data plan, checkpoints, and
sampled-label curvature batches.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import ray

from rayattr.runtime import hooks
from rayattr.capture.pseudo import label_seed
from rayattr.config import Config
from rayattr.data import BatchPlan, DataError, load_tokenizer
from rayattr.data.run_data import rank_tokens
from rayattr.record import NonFiniteLoss, Recorder, projection_spec, state_dict_bytes  # noqa: F401 (re-exported)
from rayattr.store import Run, StoreOptions
from rayattr.train.backend import join_process_group
from rayattr.train import checkpoints, states
from rayattr.model.loss import micro_batch_loss
from rayattr.train.engine import build_engine
from rayattr.model.build import build_model
from rayattr.train.quiet import quiet_known_noise
from rayattr.store.layout import INITIAL_WEIGHTS


class RankWorker:
    """The training loop of one rank; rayattr/train/trainer.py runs one per Ray Train worker."""

    def __init__(self, rank: int, world_size: int, config: dict, run_uri: str,
                 storage_options: dict | None = None):
        self.rank, self.world_size = rank, world_size
        self.cfg = Config.from_dict(config)
        quiet_known_noise(expect_gpu=self.cfg.train.use_gpu)
        self.options = StoreOptions(storage_options=storage_options or {})
        self.run = Run.open_uri(run_uri, options=self.options, mode="record")
        self.device = join_process_group(self.cfg)  # Ray Train made the group
        self._setup()

    def _setup(self) -> None:
        cfg = self.cfg
        self._load_data()
        t = cfg.train
        self.plan = BatchPlan(self.data.n_train, t.micro_batch, self.world_size, t.grad_accum, t.epochs, t.seed)
        self.num_steps = min(self.plan.num_steps, t.steps or self.plan.num_steps)
        if self.data.lay.num_steps < self.num_steps or self.data.lay.world_size != self.world_size:
            raise DataError(f"the run's token shards hold {self.data.lay.num_steps} steps for "
                            f"{self.data.lay.world_size} ranks; training needs {self.num_steps} for {self.world_size}")

        model = build_model(cfg.model, self.tokenizer.vocab_size, cfg.data.seq_len, seed=t.seed)
        if self.rank == 0 and not self.run.exists(INITIAL_WEIGHTS):
            self.run.write_bytes(INITIAL_WEIGHTS, state_dict_bytes(model))
        self.engine = build_engine(cfg, model, self.num_steps)
        # takeover: the trainer kills a failed gang before starting the next, so a writer
        # still registered open for this rank is a dead one (possibly on another node)
        self.recorder = Recorder(self.engine, self.run, cfg, rank=self.rank, world_size=self.world_size,
                                 takeover=True)
        # Resuming: weights and optimizer from Ray Train's latest checkpoint; the steps from
        # there to the last committed one are recomputed (identically) but not written again.
        self.start_step = checkpoints.restore(self.engine, self.rank)

    def _load_data(self) -> None:
        """The run's training data and tokenizer (one call site: data loading lives in rayattr.data)."""
        self.tokenizer = load_tokenizer(self.cfg.data.tokenizer)
        # only this rank's rows of each step, read from the token shards (data/shards.py)
        self.data = rank_tokens(self.run, self.rank)

    # ------------------------------------------------------------------ info for the driver

    def layer_dims(self) -> dict[str, int]:
        return self.recorder.layer_dims()

    def info(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "start_step": self.start_step, "node": ray.util.get_node_ip_address(),
                "global_batch": self.plan.global_batch_size, "layer_dims": self.recorder.layer_dims(),
                "steps_per_epoch": self.plan.steps_per_epoch, "n_train": self.data.n_train,
                "truncated": int(self.data.num_truncated)}

    # ------------------------------------------------------------------ training

    def _batch(self, step: int, micro: int, rows: int | None = None):
        """The first `rows` (default all) rows of this rank's micro-batch `micro` of `step`."""
        b = self.data.micro_batch(step, micro)
        return tuple(b[k][:rows].to(self.device) for k in ("input_ids", "attention_mask", "labels"))

    def _curvature_batches(self, step: int) -> None:
        """capture.curvature="sampled": pseudo-gradients of the first share of each micro-batch."""
        c = self.cfg.capture
        for micro in range(self.cfg.train.grad_accum):
            ids, mask, _ = self._batch(step, micro, max(1, math.ceil(self.cfg.train.micro_batch * c.curvature_fraction)))
            self.recorder.sample_curvature(ids, mask, seed=label_seed(self.cfg.train.seed, c.seed, step, self.rank, micro))

    def train_steps(self, start: int, end: int, on_step: Callable[..., None] | None = None) -> dict[str, Any]:
        """Run optimizer steps [start, end); returns mean loss and timing. `on_step(step=, loss=,
        seconds=)` after each step (rank 0's progress): the steps done, this rank's loss of the
        last one, the seconds since `start`."""
        t = self.cfg.train
        losses, t0 = [], time.perf_counter()
        for step in range(start, min(end, self.num_steps)):
            hooks.call("rank.step", rank=self.rank, step=step)  # test seam: empty in production
            ids_of_step, sources_of_step = self.data.share(step)  # this rank's rows of the step
            if self.recorder.curvature is not None:
                self._curvature_batches(step)
            batches = [self._batch(step, micro) for micro in range(t.grad_accum)]
            step_losses = []
            # the whole batch from the token shards: no id gather across ranks
            with self.recorder.step(ids_of_step.tolist(), sources_of_step.tolist(), step=step,
                                    epoch=self.plan.epoch_of(step),
                                    global_batch=self.data.step_ids(step)):
                for ids, mask, labels in batches:
                    loss = hooks.passed("rank.loss", micro_batch_loss(self.engine, ids, mask, labels),
                                        rank=self.rank, step=step)  # test seam
                    self.recorder.add_loss(loss)
                    self.engine.backward(loss)
                    self.engine.step()
                    step_losses.append(loss.item())
            losses += step_losses
            if t.states_every and (step + 1) % t.states_every == 0 and step + 1 < self.num_steps:
                states.save(self.engine, self.run, step + 1, self.rank)
            every = t.checkpoint_every
            if every and (step + 1) % every == 0:
                self.save_checkpoint(step + 1, float(np.mean(losses[-every * t.grad_accum:])))
            if on_step is not None:
                on_step(step=step + 1, loss=float(np.mean(step_losses)), seconds=time.perf_counter() - t0)
        return {"loss": float(np.mean(losses)) if losses else float("nan"), "seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------------ checkpoints and the end

    def save_checkpoint(self, step: int, loss: float) -> None:
        """Commit everything before `step`, then checkpoint through Ray Train: a checkpoint
        never runs ahead of the recorded trajectory, so resuming from it leaves no gap."""
        self.recorder.flush()
        checkpoints.save(self.engine, step, {"loss": loss})

    def finish(self) -> dict[str, Any]:
        """Commit everything and save the final weights (rank 0)."""
        return self.recorder.finish()

    def close(self) -> None:
        self.recorder.close()

