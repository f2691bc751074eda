"""RankActor: one DeepSpeed training rank inside a Ray actor, capturing and streaming gradients.

Per optimizer step a rank runs its micro-batches through the DeepSpeed engine with the
capture hooks live, then hands the step's projected per-sample gradients to a background
GradientWriter. Rank 0 also writes the step record (lr, per-sample step size, global batch).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import ray
import torch

from rayattr.capture import GradientCapture, ProjectionSpec
from rayattr.capture.pseudo import sampled_label_losses
from rayattr import hooks
from rayattr.config import Config
from rayattr.data import BatchPlan, DataError, load_tokenizer
from rayattr.data.run_data import rank_tokens
from rayattr.store import GradientWriter, Run, StepRecord, StoreOptions
from rayattr.store.layout import UPDATE_KIND
from rayattr.optimizer import resolve_optimizer
from rayattr.train.adam_state import adam_step_count, read_preconditioners
from rayattr.train.backend import join_process_group
from rayattr.train.checkpoints import Checkpoints
from rayattr.train.engine import build_engine, clip_coefficient, grad_norm_before_step, micro_batch_loss
from rayattr.train.lookahead import lookahead_preconditioners
from rayattr.train.model import SAMPLE_LOSS_REDUCTION, build_model, logits_of
from rayattr.train.quiet import quiet_known_noise


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss; what was committed so far stays readable."""


def projection_spec(cfg: Config) -> ProjectionSpec:
    c = cfg.capture
    return ProjectionSpec(rank=c.rank, seed=c.seed, kind=c.kind)


def state_dict_bytes(module: torch.nn.Module) -> bytes:
    """float32 safetensors of a module's weights.

    Copies each tensor: DeepSpeed flattens parameters into shared buffers and tied weights
    (lm_head / wte) share storage, both of which safetensors refuses to save as views.
    """
    from safetensors.torch import save

    return save({k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()})


class RankWorker:
    """The training loop of one rank (plain class; `RankActor` is its Ray actor)."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int,
                 config: dict, run_uri: str, storage_options: dict | None = None):
        self.rank, self.world_size = rank, world_size
        self.cfg = Config.from_dict(config)
        quiet_known_noise(expect_gpu=self.cfg.train.use_gpu)
        self.options = StoreOptions(storage_options=storage_options or {})
        self.run = Run.open_uri(run_uri, options=self.options, readonly=False)
        self.device = join_process_group(self.cfg, rank, world_size, master_addr, master_port)
        self._setup()

    def _setup(self) -> None:
        cfg = self.cfg

        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        # only this rank's rows of each step, read from the token shards (data/shards.py)
        self.data = rank_tokens(self.run, self.rank)
        t = cfg.train
        self.plan = BatchPlan(self.data.n_train, t.micro_batch, self.world_size, t.grad_accum, t.epochs, t.seed)
        self.num_steps = min(self.plan.num_steps, t.steps or self.plan.num_steps)
        if self.data.lay.num_steps < self.num_steps or self.data.lay.world_size != self.world_size:
            raise DataError(f"the run's token shards hold {self.data.lay.num_steps} steps for "
                            f"{self.data.lay.world_size} ranks; training needs {self.num_steps} for {self.world_size}")

        model = build_model(cfg.model, self.tokenizer.vocab_size, cfg.data.seq_len, seed=t.seed)
        if self.rank == 0 and not self.run.exists("weights/initial.safetensors"):
            self.run.write_bytes("weights/initial.safetensors", state_dict_bytes(model))
        self.engine = build_engine(cfg, model, self.num_steps)
        self.optimizer = resolve_optimizer(cfg)
        self.precondition_step = 0  # Adam's counter of the v the update rows use (0: none yet, u = g)
        self.capture = GradientCapture(self.engine.module, projection=projection_spec(cfg), layers=cfg.capture.layers)
        self.curvature = None
        if cfg.capture.curvature == "sampled":
            self.curvature = GradientCapture(self.engine.module, projection=projection_spec(cfg),
                                             layers=cfg.capture.layers)
        dims = self.capture.layer_dims()
        # takeover: the trainer kills a failed gang before starting the next, so a writer
        # still registered open for this rank is a dead one (possibly on another node)
        common = dict(dtype=cfg.capture.dtype, steps_per_shard=cfg.store.steps_per_shard, takeover=True)
        self.writer = GradientWriter(self.run, self.rank, dims, kind="train", **common)
        self.curv_writer = (GradientWriter(self.run, self.rank, dims, kind="curvature", **common)
                            if self.curvature is not None else None)
        # AdamW: update rows u = P g next to the raw rows (docs/method.md §7)
        self.update_writer = (GradientWriter(self.run, self.rank, dims, kind=UPDATE_KIND, **common)
                              if self.optimizer.adamw else None)
        self.pending_records: list[StepRecord] = []
        self._step_losses: list[float] = []  # this step's global-batch mean loss per micro-step
        # Resuming: weights and optimizer from the last complete checkpoint; the steps from
        # there to the last committed one are recomputed (identically) but not written again.
        self.checkpoints = Checkpoints(self.run, self.rank)
        self.start_step = self.checkpoints.restore(self.engine)
        last = lambda w: -1 if w is None or w.last_committed_step is None else w.last_committed_step  # noqa: E731
        records = max((r.step for r in self.run.step_records()), default=-1) if self.rank == 0 else -1
        self.stored_through = {"train": last(self.writer), "curvature": last(self.curv_writer),
                               UPDATE_KIND: last(self.update_writer), "records": records}

    # ------------------------------------------------------------------ info for the driver

    def layer_dims(self) -> dict[str, int]:
        return self.capture.layer_dims()

    def info(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "start_step": self.start_step, "node": ray.util.get_node_ip_address(), "global_batch": self.plan.global_batch_size,
                "layer_dims": self.capture.layer_dims(), "steps_per_epoch": self.plan.steps_per_epoch,
                "n_train": self.data.n_train, "truncated": self.data.num_truncated}

    # ------------------------------------------------------------------ training

    def _loss_scale(self) -> float:
        """Factor between the backpropagated loss and the sum of per-sample losses."""
        t = self.cfg.train
        scale = 1.0 / (t.micro_batch * t.grad_accum)  # mean over micro-batch, DeepSpeed's 1/grad_accum
        if self.engine.fp16_enabled():
            opt = self.engine.optimizer
            scale *= float(getattr(opt, "cur_scale", getattr(opt, "loss_scale", 1.0)))
        return scale

    def _batch(self, step: int, micro: int, rows: int | None = None):
        """The first `rows` (default all) rows of this rank's micro-batch `micro` of `step`."""
        b = self.data.micro_batch(step, micro)
        return tuple(b[k][:rows].to(self.device) for k in ("input_ids", "attention_mask", "labels"))

    def _pseudo_gradients(self, step: int, micro: int) -> None:
        """Sampled-label pseudo-gradients at the current weights, without touching .grad."""
        m = max(1, math.ceil(self.cfg.train.micro_batch * self.cfg.capture.curvature_fraction))
        ids, mask, _ = self._batch(step, micro, m)
        gen = torch.Generator(device=self.device).manual_seed(hash((self.cfg.train.seed, step, self.rank)) % 2**31)
        params = [p for p in self.engine.module.parameters() if p.requires_grad]
        with self.curvature:
            self.curvature.set_mask(mask)
            logits = logits_of(self.engine.module, ids, mask)[:, :-1]
            losses = sampled_label_losses(logits.float(), generator=gen, mask=mask[:, 1:],
                                          reduction=SAMPLE_LOSS_REDUCTION)
            torch.autograd.grad(losses.sum(), params, allow_unused=True)

    def train_steps(self, start: int, end: int) -> dict[str, Any]:
        """Run optimizer steps [start, end); returns mean loss and timing."""
        t = self.cfg.train
        share = t.micro_batch * t.grad_accum
        positions = self.rank * share + np.arange(share)
        losses, t0 = [], time.perf_counter()
        for step in range(start, min(end, self.num_steps)):
            hooks.call("rank.step", rank=self.rank, step=step)  # test seam: empty in production
            lr = float(self.engine.get_lr()[0]) if self.engine.get_lr() else t.lr
            rows = self.data.share(step)  # (ids, sources) of this rank's rows of the step
            self._refresh_preconditioner(step)
            curv_rows: dict[str, list[torch.Tensor]] = {}
            if self.curvature is not None:
                # weights only move at the step boundary, so all micro-batches' pseudo-gradients
                # are taken at θ_t before the training pass (whose hooks are not live yet)
                for micro in range(t.grad_accum):
                    self._pseudo_gradients(step, micro)
                    for n, g in self.curvature.gradients().items():
                        curv_rows.setdefault(n, []).append(g)
            with self.capture:
                for micro in range(t.grad_accum):
                    ids, mask, labels = self._batch(step, micro)
                    self.capture.set_mask(mask)
                    self.capture.loss_scale = self._loss_scale()
                    loss = hooks.passed("rank.loss", micro_batch_loss(self.engine, ids, mask, labels),
                                        rank=self.rank, step=step)  # test seam
                    total = self._loss_of_all_ranks(loss)
                    if not math.isfinite(total):
                        self.close()
                        raise NonFiniteLoss(f"rank {self.rank}: loss is {total} at step {step}; "
                                            f"steps before {step} are committed in {self.run.uri}")
                    self.engine.backward(loss)
                    norm = grad_norm_before_step(self.engine) if micro == t.grad_accum - 1 else None
                    self.engine.step()
                    losses.append(loss.item())
            applied = self.engine.was_step_applied()
            clip = clip_coefficient(self.engine, norm)
            # a skipped fp16 step moved nothing; clipping scales every sample's step alike
            eta = clip * lr / self.plan.global_batch_size if applied else 0.0
            grads = self.capture.gradients()
            updates = self._update_rows(grads)
            self._record(step, lr, eta, rows, positions, grads, curv_rows, clip, updates)
            every = t.checkpoint_every
            if every and (step + 1) % every == 0:
                self.save_checkpoint(step + 1)
        self._commit_records()
        return {"loss": float(np.mean(losses)) if losses else float("nan"), "seconds": time.perf_counter() - t0}

    def _refresh_preconditioner(self, step: int) -> None:
        """AdamW: before the step's forwards, set the capture's preconditioner: from v_t with
        capture.preconditioner "lookahead", else every capture.precondition_every steps from
        Adam's v as it stands (after step - 1). Every rank calls
        this at the same steps: under ZeRO 1/2 reading v is a collective. A resumed rank starts
        at a checkpoint, which config validation puts on a refresh step."""
        c = self.cfg.capture
        if not self.optimizer.adamw or step % c.precondition_every:
            return
        exact = self.capture.projection is None
        if c.preconditioner == "lookahead":  # v_t, from one extra pass (rayattr/train/lookahead.py)
            batches = (self._batch(step, micro) for micro in range(self.cfg.train.grad_accum))
            pre, k = lookahead_preconditioners(self.engine, self.capture.layer_names(), self.optimizer, batches,
                                               self.cfg.train.grad_accum, self.world_size, exact=exact)
        else:
            pre, k = read_preconditioners(self.engine, self.capture.layer_names(), self.optimizer, exact=exact)
        self.capture.set_preconditioner(pre)
        self.precondition_step = k

    def _update_rows(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The step's update rows; u = g while there is no v yet (the first step)."""
        if not self.optimizer.adamw:
            return None
        return self.capture.updates() if self.precondition_step else grads

    def _loss_of_all_ranks(self, loss: torch.Tensor) -> float:
        """Sum of every rank's loss. Non-finite on one rank makes it non-finite on all, so all
        ranks stop at the same step and commit what they hold; a rank stopping alone would leave
        its peers in a collective, to be killed with uncommitted data."""
        total = loss.detach().float().reshape(1).clone()
        if self.world_size > 1:
            torch.distributed.all_reduce(total)
        self._step_losses.append(total.item() / self.world_size)  # every rank's micro-batch is the same size
        return total.item()

    def _record(self, step, lr, eta, rows, positions, grads, curv_rows, clip, updates=None) -> None:
        """Hand one step's gradients (and, on rank 0, its step record) to the store.

        After a restart, steps up to what is already committed are recomputed (identically)
        but not written again, so the trajectory has neither gaps nor duplicates.
        """
        done = self.stored_through
        loss, self._step_losses = (float(np.mean(self._step_losses)) if self._step_losses else None), []
        ids, sources = rows
        if step > done["train"]:
            self.writer.write_step(step, ids.tolist(), sources.tolist(), grads, positions=positions.tolist())
        if self.update_writer is not None and step > done[UPDATE_KIND]:
            self.update_writer.write_step(step, ids.tolist(), sources.tolist(), updates, positions=positions.tolist())
        if self.curv_writer is not None and step > done["curvature"]:
            cat = {n: torch.cat(v) for n, v in curv_rows.items()}
            m = next(iter(cat.values())).shape[0]
            self.curv_writer.write_step(step, [-1] * m, [""] * m, cat)
        if self.rank == 0 and step > done["records"]:
            step_ids, step_sources = self.data.step_ids(step)  # the global batch, from the shards
            self.pending_records.append(StepRecord(
                step=step, epoch=self.plan.epoch_of(step), lr=lr, eta=eta, clip=clip,
                sample_ids=step_ids.tolist(), sources=step_sources.tolist(),
                ranks=self.plan.owner(step).ranks.tolist(), loss=loss,
                **self._optimizer_fields()))

    def _optimizer_fields(self) -> dict[str, Any]:
        """What a step record says about AdamW: λ, β's, ε, the bias-correction step, the v used."""
        o = self.optimizer
        if not o.adamw:
            return {}
        return dict(optimizer="adamw", weight_decay=o.weight_decay, beta1=o.beta1, beta2=o.beta2, eps=o.eps,
                    adam_step=adam_step_count(self.engine), precondition_step=self.precondition_step)

    # ------------------------------------------------------------------ checkpoints and the end

    def save_checkpoint(self, step: int) -> None:
        """Commit everything before `step`, then checkpoint: a checkpoint never runs ahead of
        the recorded trajectory, so resuming from it leaves no gap."""
        for w in (self.writer, self.curv_writer, self.update_writer):
            if w is not None:
                w.flush()
        self._commit_records()
        self.checkpoints.save(self.engine, step)

    def finish(self) -> dict[str, Any]:
        """Commit everything and save the final weights (rank 0)."""
        self.close()
        if self.rank == 0:
            self.run.write_bytes("weights/final.safetensors", state_dict_bytes(self.engine.module))
        return {"rank": self.rank, "last_committed_step": self.writer.last_committed_step}

    def close(self) -> None:
        for w in (self.writer, self.curv_writer, self.update_writer):
            if w is not None:
                w.close()
        self._commit_records()

    def _commit_records(self) -> None:
        """Write the step records gathered since the last commit (only rank 0 gathers any)."""
        if self.pending_records:
            self.run.write_step_records(self.pending_records)
            self.pending_records = []


RankActor = ray.remote(RankWorker)
