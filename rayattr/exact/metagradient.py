"""The exact first-order response of a finished run's validation loss to every occurrence's
loss weight, by a checkpointed reverse pass through the replayed trajectory (docs/method.md §10):

    exact(t, z) = −∂ℓ_val(θ_T) / ∂w_{t,z}

the ε → 0 limit of Δloss/ε for removing weight ε of occurrence z at step t (rayattr's sign:
positive = it helped). Nothing is approximated: m, v, the clip factor κ, the bias corrections
and the full Hessian all respond. It is specific to the validation loss: it answers the
question values/samples.parquet answers, exactly, and no other test.

Memory: the states at every checkpoint (θ, m, v in float64) plus one segment's graph. With a
checkpoint every √T steps both grow as √T: the one stage that grows with the run's steps, which
`rayattr plan` counts and `rayattr exact` states before it starts. States the run kept
(train.states_every) are read again from the run when their segment is differentiated, not held.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from rayattr.exact.limits import checkpoint_bytes, default_every
from rayattr.exact.replay import FREEZABLE, ExactError, Replay, State
from rayattr.exact.sharpness import end_sharpness
from rayattr.store.layout import EXACT_SAMPLES, EXACT_SOURCES, EXACT_SUMMARY, FINAL_WEIGHTS, SAMPLE_VALUES

log = logging.getLogger(__name__)

FIRST_STEP_TOLERANCE = 1e-4
"""Largest relative miss of the recorded training loss or clip factor at step 0 for which the
replay is this run's arithmetic. float32 training against a float64 replay misses by about 1e-7
there; a replay of different arithmetic (dropout, bf16 weights, another data plan) by far more."""

DEPARTURE = 1e-2
"""A relative miss of the loss or clip factor above which the replay has left the run's own
trajectory: the rounding difference between float32 and float64 has been amplified about 10⁵-fold."""


@dataclass
class ExactResult:
    samples: pa.Table
    """sample_id, source, step, epoch, value: one row per occurrence, as values/samples.parquet."""
    summary: dict


class Reproduction:
    """How closely the replay follows the recorded run, step by step (docs/method.md §10).

    A miss at step 0 means the replay is not the run's arithmetic: an ExactError. A later
    departure is the run itself amplifying rounding (a chaotic stretch of its trajectory): the
    step it happens at is recorded, and from there the exact values are those of a sibling
    trajectory, as close to the run as float32 is to float64."""

    def __init__(self, replay: Replay):
        self.replay = replay
        self.worst = 0.0
        self.departs_at: int | None = None
        self.anchor_distance = 0.0

    def check(self, t: int, loss: float, kappa: float) -> None:
        rec = self.replay.records[t]
        misses = [abs(kappa - rec.clip) / max(abs(rec.clip), 1e-12)]
        if rec.loss is not None:
            misses.append(abs(loss - rec.loss) / max(abs(rec.loss), 1e-12))
        miss = max(misses)
        if t == 0 and miss > FIRST_STEP_TOLERANCE:
            raise ExactError(
                f"the float64 replay does not reproduce the first step of run {self.replay.run.uri}: recorded "
                f"loss {rec.loss}, clip {rec.clip:.6g}; replayed {loss:.6g}, {kappa:.6g} (tolerance "
                f"{FIRST_STEP_TOLERANCE:g} relative). Exact values need a deterministic run: no dropout, "
                "float32 or float64 weights, the recorded data plan")
        if miss > DEPARTURE and self.departs_at is None:
            self.departs_at = t
        self.worst = max(self.worst, miss)

    def anchor(self, replayed: State, recorded: State) -> None:
        """Where the replay stands when the run's own state re-seats it: ‖θ(replay) − θ(run)‖ / ‖θ(run)‖."""
        self.anchor_distance = max(self.anchor_distance, _relative(replayed.params, recorded.params))

    def final_distance(self, params: dict[str, torch.Tensor]) -> float | None:
        """‖θ_T(replay) − θ_T(run)‖ / ‖θ_T(run)‖ from the run's final weights, when it kept them."""
        from safetensors.torch import load

        run = self.replay.run
        if not run.exists(FINAL_WEIGHTS):
            return None
        final = load(run.read_bytes(FINAL_WEIGHTS))
        return _relative(params, {n: final[n] for n in params if n in final})

    def summary(self) -> dict:
        return {"replay_max_relative_miss": self.worst, "replay_departs_at": self.departs_at,
                "anchor_max_relative_distance": self.anchor_distance}


def _relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float | None:
    """‖a − b‖ / ‖b‖ over the tensors b has."""
    num = sum(float(((a[n].detach() - b[n].double()) ** 2).sum()) for n in b)
    den = sum(float((b[n].double() ** 2).sum()) for n in b)
    return math.sqrt(num / den) if den > 0 else None


def exact_values(replay: Replay, every: int | None = None, freeze: frozenset = frozenset(),
                 progress: bool = False, anchor: bool = True) -> ExactResult:
    """−∂ℓ_val/∂w for every occurrence of the run, by checkpointed reverse-mode through the
    replay. `every`: steps between checkpoints (default: the run's kept states' spacing, else
    ⌈√T⌉). `freeze`: hold κ and/or v at the run's values (the response of the run with that
    piece frozen). `anchor`: re-seat the replay on the states the run kept (train.states_every)."""
    bad = set(freeze) - set(FREEZABLE)
    if bad:
        raise ExactError(f"cannot freeze {sorted(bad)}; choose from {FREEZABLE}")
    T, B = replay.num_steps, replay.batch_size()
    anchors = [a for a in replay.anchor_steps() if 0 < a < T] if anchor else []
    if every is None:  # the run's own states are the checkpoints, when it kept them
        every = min(np.diff([0, *anchors, T])) if anchors else default_every(T)
    if every < 1:
        raise ExactError(f"checkpoint spacing must be at least 1 step, got {every}")
    held = 0 if anchors else checkpoint_bytes(replay.num_params, T, every, replay.optimizer == "adamw")
    log.info("exact: %d steps, %d parameters, a checkpoint every %d steps (%s; %.2f GiB held) and one "
             "segment's graph", T, replay.num_params, every, "the run's kept states" if anchors else "replayed",
             held / 2**30)
    started = time.perf_counter()
    ones = torch.ones(B, dtype=torch.float64)

    # forward: the trajectory without a graph, re-seated on the run's own state wherever it kept
    # one, its state kept at every other checkpoint (a kept one is read again when its segment
    # is differentiated, so memory does not grow with the states the run kept)
    checkpoints: dict[int, State | None] = {}
    state, seen = replay.initial_state(), Reproduction(replay)
    for t in range(T):
        if t in anchors:
            recorded = replay.recorded_state(t)
            seen.anchor(state, recorded)
            state, checkpoints[t] = recorded, None
        elif t % every == 0:
            checkpoints[t] = state
        state, kappa, loss = replay.step(state, t, ones, differentiable=False)
        seen.check(t, loss, kappa)
        if progress and t % 16 == 0:
            log.info("exact: replayed step %d/%d", t, T)
    forward_s = time.perf_counter() - started

    final = state.leaves()
    with torch.enable_grad():
        val_loss = replay.val_loss(final.params)
        adjoint = list(torch.autograd.grad(val_loss, list(final.params.values())))
    sharp = end_sharpness(replay, final.params, adjoint)
    adjoint += [torch.zeros_like(x) for x in [*final.m.values(), *final.v.values()]]

    # backward: each segment re-run with its graph from its checkpoint, the last first
    values = np.zeros((T, B))
    starts = sorted(checkpoints)
    for start, end in reversed(list(zip(starts, [*starts[1:], T]))):
        kept = checkpoints.pop(start)
        begin = (replay.recorded_state(start) if kept is None else kept).leaves()
        w = torch.ones(end - start, B, dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            cur = begin
            for t in range(start, end):
                cur, _, _ = replay.step(cur, t, w[t - start], differentiable=True, freeze=freeze)
            pairing = sum((a * x).sum() for a, x in zip(adjoint, cur.tensors()))
            grads = torch.autograd.grad(pairing, [w, *begin.tensors()], allow_unused=True)
        values[start:end] = -grads[0].numpy()
        adjoint = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads[1:], begin.tensors())]
        if progress:
            log.info("exact: steps %d–%d differentiated", start, end)

    summary = {"num_steps": T, "occurrences": T * B, "checkpoint_every": int(every), "anchors": len(anchors),
               "freeze": sorted(freeze), "val_loss": float(val_loss.detach()), **seen.summary(),
               "final_weights_relative_distance": seen.final_distance(final.params), "forward_s": round(forward_s, 2),
               "total_s": round(time.perf_counter() - started, 2), "num_params": replay.num_params,
               "sharpness": sharp}
    return ExactResult(_occurrences(replay, values), summary)


def _occurrences(replay: Replay, values: np.ndarray) -> pa.Table:
    """One row per occurrence in the step records' order, with its source and epoch."""
    ids, sources, steps, epochs, vals = [], [], [], [], []
    for t, rec in enumerate(replay.records):
        _, batch_ids = replay.batch(t)
        if sorted(batch_ids.tolist()) != sorted(rec.sample_ids):
            raise ExactError(f"step {t}: the token shards hold samples {sorted(batch_ids.tolist())[:8]}…, "
                             f"the step record {sorted(rec.sample_ids)[:8]}…: the run's data and records disagree")
        col = {int(z): i for i, z in enumerate(batch_ids)}
        for z, s in zip(rec.sample_ids, rec.sources):
            ids.append(z)
            sources.append(s)
            steps.append(t)
            epochs.append(rec.epoch)
            vals.append(values[t, col[z]])
    return pa.table({"sample_id": pa.array(ids, pa.int64()), "source": pa.array(sources, pa.string()),
                     "step": pa.array(steps, pa.int64()), "epoch": pa.array(epochs, pa.int64()),
                     "value": pa.array(vals, pa.float64())})


# ------------------------------------------------------------------ how the run's values compare


def bands(num_steps: int, warmup_end: int) -> dict[str, tuple[int, int]]:
    """The phases of training the agreement is reported for: the warm-up (steps before the
    learning rate peaks), the middle half and the last quarter."""
    out = {"warm-up": (0, warmup_end), "middle": (num_steps // 4, 3 * num_steps // 4),
           "last quarter": (3 * num_steps // 4, num_steps)}
    return {k: v for k, v in out.items() if v[1] > v[0]}


def agreement(values: pa.Table, exact: pa.Table, warmup_end: int) -> dict[str, dict]:
    """Per phase: the run's values against the exact response, occurrence by occurrence —
    Spearman, and the rms ratio (values ÷ exact; 1 is the right size)."""
    from rayattr.validate.stats import spearman

    key = ["step", "sample_id"]
    joined = values.select(key + ["value"]).join(exact.select(key + ["value"]).rename_columns(key + ["exact"]), key)
    step = joined["step"].to_numpy()
    v, x = joined["value"].to_numpy(), joined["exact"].to_numpy()
    out = {}
    for name, (a, b) in bands(int(exact["step"].to_numpy().max()) + 1, warmup_end).items():
        m = (step >= a) & (step < b)
        rms_x = float(np.sqrt(np.mean(x[m] ** 2))) if m.any() else 0.0
        out[name] = {"steps": [a, b], "occurrences": int(m.sum()), "spearman": spearman(v[m], x[m]),
                     "rms_ratio": float(np.sqrt(np.mean(v[m] ** 2))) / rms_x if rms_x > 0 else None,
                     "exact_rms": rms_x}
    return out


def write_exact(run, result: ExactResult, seed: int = 0) -> dict:
    """exact/samples.parquet, exact/sources.parquet and exact/summary.json, the summary with the
    run's values' agreement by phase when the run has values."""
    from rayattr.reduce.aggregate import source_values

    run.write_table(EXACT_SAMPLES, result.samples)
    run.write_table(EXACT_SOURCES, source_values(result.samples, seed))
    summary = dict(result.summary)
    if run.exists(SAMPLE_VALUES):
        lrs = [r.lr for r in run.step_records()]
        summary["warmup_end"] = int(np.argmax(lrs))
        summary["agreement"] = agreement(run.read_table(SAMPLE_VALUES), result.samples, summary["warmup_end"])
    run.write_json(EXACT_SUMMARY, summary)
    return summary
