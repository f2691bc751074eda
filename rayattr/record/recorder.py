"""Recorder: what one rank of a user's own training loop hands rayattr at each optimizer step.

    recorder = rayattr.Recorder(engine, run_uri, config)
    for ids, sources, batch in loader:                 # one optimizer step per iteration
        with recorder.step(ids, sources):               # capture hooks live inside
            loss = model_loss(engine, batch)            # mean over the micro-batch
            recorder.add_loss(loss)                     # optional: the step record's loss
            engine.backward(loss)
            engine.step()
    recorder.finish()                                   # final weights; the run is "recorded"

Inside the block the capture hooks record each sample's projected gradient; at its end the
step record (lr, κ, η = κ·lr/|B|, the global batch, AdamW's hyper-parameters and step
counter) and the gradient rows go to the run (docs/method.md §2, §7). Rank and world size come
from torch.distributed (Ray Train, the deepspeed launcher). The built-in job trains through
this same class (rayattr/train/worker.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from functools import partial
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from rayattr.capture import GradientCapture, ProjectionSpec
from rayattr.capture.pseudo import sampled_label_losses
from rayattr.config import Config, ConfigError
from rayattr.errors import UsageError
from rayattr.optim.spec import OptimizerSpec, resolve_optimizer
from rayattr.record.batches import gather_batch, known_batch, rank_and_world
from rayattr.record.engines import steps_of
from rayattr.record.errors import NonFiniteLoss
from rayattr.store import GradientWriter, Run, StepRecord, StoreOptions
from rayattr.store.layout import CURVATURE_KIND, CURVATURE_UPDATE_KIND, UPDATE_KIND, V_RESPONSE_KIND
from rayattr.store.records import StepRecordWriter
from rayattr.store.registrations import wait_closed
from rayattr.store.uploader import BackgroundUploader
from rayattr.optim.adam_state import (adam_step_count, basic_optimizer, first_moments, read_preconditioners,
                                      read_responses)
from rayattr.model.loss import SAMPLE_LOSS_REDUCTION, logits_of
from rayattr.store.layout import FINAL_WEIGHTS, TRAIN_DATA

# how long rank 0's finish() waits for the other ranks' writers to close (no process group)
FINISH_TIMEOUT_S = 600.0
RECORDED = "recorded"  # manifest status of a run whose training is recorded, not yet attributed


def projection_spec(cfg: Config) -> ProjectionSpec:
    c = cfg.capture
    return ProjectionSpec(rank=c.rank, seed=c.seed, kind=c.kind, mix=c.mix, members=c.members)


def state_dict_bytes(module: torch.nn.Module) -> bytes:
    """float32 safetensors of a module's weights.

    Copies each tensor: DeepSpeed flattens parameters into shared buffers and tied weights
    (lm_head / wte) share storage, both of which safetensors refuses to save as views.
    """
    from safetensors.torch import save

    return save({k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()})


def _open_run(run: Run | str, storage_options: dict | None) -> Run:
    if isinstance(run, Run):
        return run
    if not isinstance(run, str):
        raise TypeError(f"run must be a Run or a run URI, got {type(run).__name__}")
    return Run.open_uri(run, options=StoreOptions(storage_options=storage_options or {}), mode="record")


def _config(run: Run, config: Config | dict | None) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return Config.from_dict(config)
    if config is None and "config" in run.manifest:
        return Config.from_dict(run.manifest["config"])
    raise ConfigError(f"Recorder: run {run.uri} has no recorded config; pass config= (a rayattr Config)")


def check_optimizer(owner, spec: OptimizerSpec) -> None:
    """The optimizer that trains must be the one the attribution models (rayattr/optim/spec.py)."""
    opt = basic_optimizer(owner)
    group = opt.param_groups[0]
    if spec.adamw:
        if not isinstance(opt, torch.optim.AdamW):
            raise ConfigError(f"train.optimizer is adamw but the engine trains with {type(opt).__name__}")
        got = dict(beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"])
        want = dict(beta1=spec.beta1, beta2=spec.beta2, eps=spec.eps)
        diff = [f"{k}: optimizer {got[k]} != config {want[k]}" for k in got if float(got[k]) != float(want[k])]
        if diff:
            raise ConfigError("the AdamW that trains differs from train.optimizer: " + "; ".join(diff))
    elif isinstance(opt, torch.optim.Adam | torch.optim.AdamW) or group.get("momentum", 0):
        raise ConfigError(f"train.optimizer is sgd (no momentum) but the engine trains with {type(opt).__name__}"
                          f"{' with momentum' if group.get('momentum', 0) else ''}: set train.optimizer to match "
                          "(docs/method.md §2, §7)")


class Recorder:
    """Records one rank's training steps into a run (see the module docstring).

    Args:
        engine: the DeepSpeed engine, or a plain torch model (then `optimizer=` too).
        run: the Run or its URI (made by `rayattr.new_run`).
        config: the rayattr Config (capture, store and optimizer settings); None = the run's.
        optimizer: the torch optimizer of a plain torch model.
        rank, world_size: default torch.distributed's, else a single process.
        takeover: this rank's earlier writers are known dead (a restarted rank).
    """

    def __init__(self, engine, run: Run | str, config: Config | dict | None = None, *, optimizer=None,
                 rank: int | None = None, world_size: int | None = None,
                 storage_options: dict | None = None, takeover: bool = False):
        self.training = steps_of(engine, optimizer)
        self.module = self.training.module
        self.rank, self.world_size = rank_and_world(rank, world_size)
        self.run = _open_run(run, storage_options)
        self.cfg = cfg = _config(self.run, config)
        self.optimizer = resolve_optimizer(cfg)
        check_optimizer(self.training.optimizer_owner, self.optimizer)
        self.precondition_step = 0  # Adam's counter of the v the update rows use (0: none yet, u = g)
        spec = projection_spec(cfg)
        # AdamW's step's own P is known only after the step: its update rows wait for it
        self.step_own_p = self.optimizer.adamw and cfg.capture.preconditioner == "lookahead"
        self.capture = GradientCapture(self.module, projection=spec, layers=cfg.capture.layers,
                                       defer_updates=self.step_own_p)
        # sampled-label pseudo-gradients; under AdamW their update rows P ĝ wait for the P the
        # step's own update rows use (K's curvature term is P H: docs/method.md §7)
        self.curvature = (GradientCapture(self.module, projection=spec, layers=cfg.capture.layers,
                                          defer_updates=self.optimizer.adamw)
                          if cfg.capture.curvature == "sampled" else None)
        dims = self.capture.layer_dims()
        common = dict(dtype=cfg.capture.dtype, steps_per_shard=cfg.store.steps_per_shard, takeover=takeover)
        self.writer = GradientWriter(self.run, self.rank, dims, kind="train", **common)
        self.curv_writer = (GradientWriter(self.run, self.rank, dims, kind=CURVATURE_KIND, **common)
                            if self.curvature is not None else None)
        self.curv_update_writer = (GradientWriter(self.run, self.rank, dims, kind=CURVATURE_UPDATE_KIND, **common)
                                   if self.curvature is not None and self.optimizer.adamw else None)
        self._curv_sampled = False  # the open step's pseudo-gradients were drawn
        self._preconditioner = None  # AdamW: the P of the step's update rows, for the pseudo-gradients' too
        # AdamW: update rows u = P g next to the raw rows (docs/method.md §7)
        self.update_writer = (GradientWriter(self.run, self.rank, dims, kind=UPDATE_KIND, **common)
                              if self.optimizer.adamw else None)
        # AdamW with v's response (capture.v_response, lookahead only): rows y = M_t ⊙ G beside them
        self.v_response = self.optimizer.adamw and cfg.capture.v_response
        self.response_writer = (GradientWriter(self.run, self.rank, dims, kind=V_RESPONSE_KIND, **common)
                                if self.v_response else None)
        self._m_prev: dict[str, torch.Tensor] | None = None  # m_{t−1} of the captured layers
        self._responded = False  # the open step's response rows were formed
        self.pending_records: list[StepRecord] = []
        # rank 0 commits step records in the background, a shard's worth at a time, as one
        # fenced writer: a zombie predecessor's late records never replace this one's
        self.records_writer = StepRecordWriter(self.run) if self.rank == 0 else None
        self._records = BackgroundUploader(2, name="rayattr-records") if self.rank == 0 else None
        self._step_losses: list[float] = []  # this step's global-batch mean loss per micro-step
        self._sources_by_id: dict[int, str] | None = None
        self._step: int | None = None  # the step whose block is open
        self._global: tuple | None = None  # the open step's global batch, where the caller gave it
        self._samples: tuple[list[int], list[str]] | None = None
        self.global_batch: int | None = None
        # Resuming: steps up to what the store holds are recomputed (identically) but not
        # written again, so the trajectory has neither gaps nor duplicates.
        last = lambda w: -1 if w is None or w.last_committed_step is None else w.last_committed_step  # noqa: E731
        last_record = self.records_writer.last_committed_step if self.rank == 0 else None
        records = -1 if last_record is None else last_record
        self.stored_through = {"train": last(self.writer), CURVATURE_KIND: last(self.curv_writer),
                               UPDATE_KIND: last(self.update_writer), V_RESPONSE_KIND: last(self.response_writer),
                               CURVATURE_UPDATE_KIND: last(self.curv_update_writer), "records": records}
        self.next_step = 0

    def layer_dims(self) -> dict[str, int]:
        return self.capture.layer_dims()

    # ------------------------------------------------------------------ one optimizer step

    @contextlib.contextmanager
    def step(self, sample_ids: Sequence[int] | None = None, sources: Sequence[str] | None = None, *,
             step: int | None = None, epoch: int = 0,
             global_batch: tuple[Sequence[int], Sequence[str]] | None = None) -> Iterator["Recorder"]:
        """The block of one optimizer step on this rank: its forwards, backwards and the
        engine's step. `sample_ids` (with `sources`, else looked up in the run's
        data/train.parquet) are this rank's samples of the step, in the order its forwards
        see them; None when they are only known inside the block (`add_samples`).
        `global_batch`: (ids, sources) of the whole step, rank-major with equal shares, where
        the caller knows it; else the ranks gather it (a collective at the step's end)."""
        step = self.next_step if step is None else int(step)
        if step < 0:
            raise UsageError(f"step must be >= 0, got {step}")
        lr = self.training.lr()
        lr = self.optimizer.lr if lr is None else lr
        self._step, self._samples, self._global = step, None, global_batch
        if sample_ids is not None:
            self.add_samples(sample_ids, sources)
        known = self._samples[0] if self._samples else None
        # rows are gradients of the backpropagated loss over this factor: the loss is a mean
        # over this rank's samples of the step (DeepSpeed's 1/grad_accum included)
        self._base_scale = 1.0 / len(known) if known else 1.0
        self._refresh_preconditioner(step)
        if self.v_response and self._m_prev is None:  # the first step (or a resumed rank's): m_{t−1}
            self._m_prev = first_moments(self.training.optimizer_owner, self.capture.module_names())
        with self.training.watch(), self.capture, self._mask_from_forwards():
            yield self
        self._end_step(step, epoch, lr, late_scale=not known)
        self.next_step = step + 1

    def add_samples(self, sample_ids: Sequence[int], sources: Sequence[str] | None = None) -> None:
        """This rank's next samples of the open step (the HF callback adds them per forward)."""
        if self._step is None:
            raise UsageError("add_samples outside a `with recorder.step(...)` block")
        ids = [int(i) for i in np.asarray(sample_ids).reshape(-1).tolist()]
        srcs = list(sources) if sources is not None else self._lookup_sources(ids)
        if len(srcs) != len(ids):
            raise UsageError(f"step {self._step}: {len(ids)} sample ids but {len(srcs)} sources")
        old = self._samples or ([], [])
        self._samples = (old[0] + ids, old[1] + [str(s) for s in srcs])

    def _lookup_sources(self, ids: list[int]) -> list[str]:
        if self._sources_by_id is None:
            if not self.run.exists(TRAIN_DATA):
                raise UsageError("sources not given and the run holds no data/train.parquet to look them up in")
            t = self.run.read_table(TRAIN_DATA).select(["id", "source"]).to_pydict()
            self._sources_by_id = dict(zip(t["id"], t["source"]))
        missing = [i for i in ids if i not in self._sources_by_id]
        if missing:
            raise UsageError(f"sample ids {missing[:5]} are not in the run's data/train.parquet")
        return [self._sources_by_id[i] for i in ids]

    @contextlib.contextmanager
    def _mask_from_forwards(self) -> Iterator[None]:
        """Each forward's attention_mask keeps padding out of the rows; the loss scale is read
        per forward (fp16's dynamic scale moves only between steps)."""
        def pre_hook(module, args, kwargs):
            self.capture.set_mask(kwargs.get("attention_mask"))
            self.capture.loss_scale = self._base_scale * self.training.loss_scale()

        handle = self.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def add_loss(self, loss: torch.Tensor) -> float:
        """One micro-batch's loss: summed over ranks (a collective, every rank calls it) for the
        step record, and checked. Non-finite on one rank is non-finite on all, so all ranks stop
        at the same step and commit what they hold (NonFiniteLoss); returns the ranks' sum."""
        total = loss.detach().float().reshape(1).clone()
        if self.world_size > 1:
            torch.distributed.all_reduce(total)
        self._step_losses.append(total.item() / self.world_size)  # every rank's micro-batch is the same size
        value = total.item()
        if not np.isfinite(value):
            self.close()
            raise NonFiniteLoss(f"rank {self.rank}: loss is {value} at step {self._step}; "
                                f"steps before {self._step} are committed in {self.run.uri}")
        return value

    def sample_curvature(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, seed: int) -> None:
        """capture.curvature="sampled": sampled-label pseudo-gradients of these samples at the
        current weights, without touching .grad, for the next recorded step. Call it before
        that step's block: the weights move only at the step boundary (docs/method.md §5).
        Several calls for one step (one per micro-batch) add their rows after each other's.
        With capture.members, each member gets capture.curvature_draws draws of its own, taken
        one member after the other from the same generator: their estimates stay independent."""
        if self.curvature is None:
            raise ConfigError("sample_curvature needs capture.curvature='sampled'")
        device = input_ids.device
        gen = torch.Generator(device=device).manual_seed(seed)
        params = [p for p in self.module.parameters() if p.requires_grad]
        # the step's first call starts its rows; later ones keep them (and, under AdamW, the
        # factors their update rows wait on)
        with self.curvature.resumed() if self._curv_sampled else self.curvature:
            self.curvature.set_mask(attention_mask)
            for member in range(self.cfg.capture.members):
                with self.curvature.only(member):
                    for _ in range(self.cfg.capture.curvature_draws):  # a forward each: one backward per forward
                        logits = logits_of(self.module, input_ids, attention_mask)[:, :-1]
                        losses = sampled_label_losses(logits.float(), generator=gen, mask=attention_mask[:, 1:],
                                                      reduction=SAMPLE_LOSS_REDUCTION)
                        torch.autograd.grad(losses.sum(), params, allow_unused=True)
        self._curv_sampled = True

    def _curvature_rows(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """The step's pseudo-gradient rows ĝ and, under AdamW, their update rows P ĝ with the P
        the step's update rows use (ĝ itself before any v, as u = g then)."""
        if not self._curv_sampled:
            raise UsageError(f"step {step}: capture.curvature='sampled' needs recorder.sample_curvature(...) "
                             "before each step's block")
        self._curv_sampled = False
        rows = self.curvature.gradients()
        if not self.optimizer.adamw:
            return rows, None
        self.curvature.finish_updates(self._preconditioner if self.precondition_step else None)
        return rows, (self.curvature.updates() if self.precondition_step else rows)

    def _refresh_preconditioner(self, step: int) -> None:
        """AdamW with capture.preconditioner "lagged": before the step's forwards, every
        capture.precondition_every steps, set the capture's preconditioner from Adam's v as it
        stands (after step - 1). Every rank calls this at the same steps: under ZeRO 1/2 the
        read is a collective. A resumed rank starts at a checkpoint, which config validation
        puts on a refresh step. (The default forms its P after the step: `_finish_updates`.)"""
        c = self.cfg.capture
        if not self.optimizer.adamw or self.step_own_p or step % c.precondition_every:
            return
        pre, k = read_preconditioners(self.training.optimizer_owner, self.capture.module_names(), self.optimizer,
                                      exact=self.capture.projection is None)
        self.capture.set_preconditioner(pre)
        self.precondition_step, self._preconditioner = k, pre

    def _finish_updates(self) -> None:
        """AdamW's default: the step's update rows with P_t, from v_t as the optimizer holds it
        right after the step's update: the v that update divided by, clipping and all, with no
        second pass (docs/method.md §7). Every rank calls it at every step (a collective under
        ZeRO 1/2). A step that updated nothing (fp16 overflow) leaves v and its counter as they
        were; before any update there is no v and u = g."""
        pre, k = read_preconditioners(self.training.optimizer_owner, self.capture.module_names(), self.optimizer,
                                      exact=self.capture.projection is None)
        response = None
        self._responded = False
        if self.v_response and k and self.training.applied():
            # a skipped update (fp16 overflow) moved neither m nor v: its rows stay zero
            response, self._m_prev = read_responses(
                self.training.optimizer_owner, self.capture.module_names(), self.optimizer, self._m_prev,
                self.cfg.capture.v_response_rank, exact=self.capture.projection is None)
            self._responded = True
        self.capture.finish_updates(pre, response)
        self.precondition_step, self._preconditioner = k, pre

    def _end_step(self, step: int, epoch: int, lr: float, late_scale: bool) -> None:
        ids, srcs = self._samples or ([], [])
        self._step = None
        if self.step_own_p:
            self._finish_updates()
        if not ids:
            raise UsageError(f"step {step}: no sample ids were given (recorder.step(ids, ...) or add_samples)")
        applied = self.training.applied()
        clip = self.training.clip()
        batch = (gather_batch(ids, srcs, self.rank, self.world_size) if self._global is None
                 else known_batch(*self._global, ids, self.rank, self.world_size))
        self.global_batch = batch.size
        # a skipped fp16 step moved nothing; clipping scales every sample's step alike
        eta = clip * lr / batch.size if applied else 0.0
        grads = self.capture.gradients()
        updates = self._update_rows(grads)
        responses = self._response_rows(grads)
        if late_scale:  # the rank's sample count became known only now
            grads = {n: g * len(ids) for n, g in grads.items()}
            updates = {n: u * len(ids) for n, u in updates.items()} if updates is not None else None
            responses = {n: y * len(ids) for n, y in responses.items()} if responses is not None else None
        for n, g in grads.items():
            if g.shape[0] != len(ids):
                raise UsageError(f"step {step}: {len(ids)} sample ids but {g.shape[0]} captured rows in layer {n!r}; "
                                 "give every sample of the rank's forwards of the step, in order")
        self._write(step, epoch, lr, eta, clip, batch, ids, srcs, grads, updates, responses)

    def _update_rows(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The step's update rows; u = g while there is no v yet (the first step)."""
        if not self.optimizer.adamw:
            return None
        return self.capture.updates() if self.precondition_step else grads

    def _response_rows(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The step's second-moment response rows (docs/method.md §7, "v's response"); zero
        where no update moved v (no rows were formed)."""
        if not self.v_response:
            return None
        return self.capture.responses() if self._responded else {n: torch.zeros_like(g) for n, g in grads.items()}

    def _write(self, step, epoch, lr, eta, clip, batch, ids, srcs, grads, updates, responses=None) -> None:
        """Hand one step's gradients (and, on rank 0, its step record) to the store; after a
        restart, what the store already holds is not written again."""
        done = self.stored_through
        loss, self._step_losses = (float(np.mean(self._step_losses)) if self._step_losses else None), []
        positions = (batch.offset + np.arange(len(ids))).tolist()
        if step > done["train"]:
            self.writer.write_step(step, ids, srcs, grads, positions=positions)
        if self.update_writer is not None and step > done[UPDATE_KIND]:
            self.update_writer.write_step(step, ids, srcs, updates, positions=positions)
        if self.response_writer is not None and step > done[V_RESPONSE_KIND]:
            self.response_writer.write_step(step, ids, srcs, responses, positions=positions)
        if self.curv_writer is not None:
            cat, cat_updates = self._curvature_rows(step)
            m = next(iter(cat.values())).shape[0]
            if step > done[CURVATURE_KIND]:
                self.curv_writer.write_step(step, [-1] * m, [""] * m, cat)
            if self.curv_update_writer is not None and step > done[CURVATURE_UPDATE_KIND]:
                self.curv_update_writer.write_step(step, [-1] * m, [""] * m, cat_updates)
        if self.rank == 0 and step > done["records"]:
            self.pending_records.append(StepRecord(
                step=step, epoch=epoch, lr=lr, eta=eta, clip=clip, sample_ids=batch.sample_ids,
                sources=batch.sources, ranks=batch.ranks, loss=loss, **self._optimizer_fields()))
        if (step + 1) % self.cfg.store.steps_per_shard == 0:  # with the gradient shards
            self.commit_records()

    def _optimizer_fields(self) -> dict[str, Any]:
        """What a step record says about AdamW: λ, β's, ε, the bias-correction step, the v used."""
        o = self.optimizer
        if not o.adamw:
            return {}
        return dict(optimizer="adamw", weight_decay=o.weight_decay, beta1=o.beta1, beta2=o.beta2, eps=o.eps,
                    adam_step=adam_step_count(self.training.optimizer_owner),
                    precondition_step=self.precondition_step)

    # ------------------------------------------------------------------ commits and the end

    def flush(self) -> None:
        """Commit everything recorded so far: call before saving a training checkpoint, so a
        checkpoint never runs ahead of the recorded trajectory (resuming from it leaves no gap)."""
        for w in self._writers():
            w.flush()
        self.commit_records()
        if self._records is not None:
            self._records.drain()

    def finish(self, weights: bool = True, timeout_s: float = FINISH_TIMEOUT_S) -> dict[str, Any]:
        """Commit everything and end the recording, a barrier: every rank closes its writers,
        the ranks synchronise (the process group's barrier when there is one), and rank 0 marks
        the run recorded (ready for `rayattr attribute`) only once the store shows every rank's
        writers closed: without a process group it waits up to `timeout_s` for them, then an
        OpenWritersError names the ranks still open and the run stays unrecorded. Rank 0 also
        saves the final weights (what attribution differentiates at)."""
        self.close()
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if self.rank == 0:
            wait_closed(self.run, [w.kind for w in self._writers()], range(self.world_size), timeout_s,
                        what="the recording cannot end while a rank's writers are open")
            if weights:
                self.run.write_bytes(FINAL_WEIGHTS, state_dict_bytes(self.module))
            last_record = self.run.last_step_record()
            fields = dict(status=RECORDED, layer_dims=self.layer_dims(), world_size=self.world_size,
                          recorded=dt.datetime.now(dt.timezone.utc).isoformat())
            if last_record is not None:
                fields["num_steps"] = last_record + 1
            if self.global_batch is not None:
                fields["global_batch"] = self.global_batch
            self.run.update_manifest(**fields)
        return {"rank": self.rank, "last_committed_step": self.writer.last_committed_step}

    def close(self) -> None:
        try:
            for w in self._writers():
                w.close()
            self.commit_records()
        finally:
            if self._records is not None:
                self._records.close()  # waits for the records, re-raises a failed commit

    def _writers(self) -> list[GradientWriter]:
        return [w for w in (self.writer, self.curv_writer, self.update_writer, self.response_writer,
                            self.curv_update_writer) if w is not None]

    def commit_records(self) -> None:
        """Hand the step records gathered since the last commit to the background commit
        (only rank 0 gathers any); `flush` or `close` waits for them."""
        if self.pending_records:
            records, self.pending_records = self.pending_records, []
            self._records.submit(partial(self.records_writer.write, records))
