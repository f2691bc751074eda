#!/usr/bin/env python
"""What rayattr adds to training: the built-in job's train stage against the same DeepSpeed
loop without the recorder, and against a plain one-process PyTorch loop, in one invocation.

On one run's data (the built-in corpus), the same model, batches and steps:
- rayattr: the train stage through rayattr's own trainer (rayattr.train.trainer.train), its
  start-up (Ray Train's gang, DeepSpeed, the data, the end) timed apart from the steps;
- deepspeed: the same TorchTrainer gang and DeepSpeed engine running the same micro-batches,
  without rayattr's recorder (no capture, no store);
- torch: one process, no Ray, no DeepSpeed: torch.optim with clipping on the global batch;
- breakdown: rayattr's rank loop again, with timers around each part of a step (the timers
  are installed here, in the bench's own loop function, not in rayattr).

    python bench/train_overhead.py                  # the built-in job (AdamW, the step's own P)
    python bench/train_overhead.py --sgd            # jobs/configs/sgd.yaml
    python bench/train_overhead.py --large --sgd    # GPT-2 4 x 256, global batch 8 x 128
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from harness import dotted, merge  # noqa: E402

LARGE = {"model": {"n_layer": 4, "n_embd": 256, "n_head": 4},
         "data": {"seq_len": 128, "builtin": {"max_chars": 256}},
         "train": {"micro_batch": 4}}  # 2 ranks x 4 = a global batch of 8 x 128 tokens


# ---------------------------------------------------------------------------- timers in a rank

class Timers:
    """Seconds and calls per name, summed over the wrapped calls of this process."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t
                self.calls[name] += 1

        setattr(owner, attr, timed)


def install_timers(timers: Timers, recorder: bool) -> None:
    """Timers around the parts of a step, at their owners' module attributes. Top-level parts
    do not nest; "collective:*" ones are inside them (the ranks' waits for each other)."""
    import deepspeed.runtime.engine as ds_engine
    import torch.distributed as dist

    timers.wrap(ds_engine.DeepSpeedEngine, "backward", "backward (rayattr: with capture hooks)")
    timers.wrap(ds_engine.DeepSpeedEngine, "step", "engine.step (DeepSpeed all-reduce, optimizer)")
    for fn in ("all_reduce", "all_gather_object", "all_gather", "reduce_scatter", "broadcast"):
        timers.wrap(dist, fn, f"collective: {fn}")
    if not recorder:
        return
    import rayattr.record.recorder as rec
    import rayattr.train.worker as worker
    from rayattr.capture import GradientCapture
    from rayattr.store import GradientWriter
    from rayattr.train.progress import ProgressWriter

    timers.wrap(worker, "micro_batch_loss", "forward")
    timers.wrap(worker.RankWorker, "_batch", "data")
    timers.wrap(rec.Recorder, "add_loss", "loss all-reduce and check")
    timers.wrap(rec.Recorder, "_finish_updates", "step's own P (v's row/column sums, deferred update rows)")
    timers.wrap(rec, "gather_batch", "global-batch id gather")
    timers.wrap(GradientCapture, "gradients", "projected rows out of the hooks")
    timers.wrap(rec.Recorder, "_update_rows", "update rows u = P g")
    timers.wrap(GradientWriter, "write_step", "gradient rows to the uploader")
    timers.wrap(rec.Recorder, "commit_records", "step records")
    timers.wrap(ProgressWriter, "post", "progress")
    timers.wrap(rec.Recorder, "flush", "flush (checkpoints)")


def timed_rank_loop(loop: dict) -> None:
    """rayattr's own rank loop with timers; rank 0 writes them to loop["out"]."""
    import ray.train

    import rayattr.train.worker as worker
    from rayattr.train.trainer import rank_loop

    timers = Timers()
    install_timers(timers, recorder=True)
    timers.wrap(worker.RankWorker, "train_steps", "all steps")
    rank_loop(loop)
    if ray.train.get_context().get_world_rank() == 0:
        Path(loop["out"]).write_text(json.dumps({"seconds": timers.seconds, "calls": timers.calls}))


def deepspeed_loop(loop: dict) -> None:
    """The same gang, engine, micro-batches and steps as rayattr's rank, without the recorder."""
    import ray.train

    from rayattr.config import Config
    from rayattr.data import BatchPlan, load_tokenizer
    from rayattr.data.run_data import rank_tokens
    from rayattr.store import Run
    from rayattr.train.backend import join_process_group
    from rayattr.model.loss import micro_batch_loss
    from rayattr.train.engine import build_engine
    from rayattr.model.build import build_model
    from rayattr.train.quiet import quiet_known_noise

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = Config.from_dict(loop["config"])
    quiet_known_noise(expect_gpu=False)
    run = Run.open_uri(loop["run"])
    device = join_process_group(cfg, rank, world, None, None)
    data = rank_tokens(run, rank)
    t = cfg.train
    plan = BatchPlan(data.n_train, t.micro_batch, world, t.grad_accum, t.epochs, t.seed)
    num_steps = min(plan.num_steps, t.steps or plan.num_steps)
    model = build_model(cfg.model, load_tokenizer(cfg.data.tokenizer).vocab_size, cfg.data.seq_len, seed=t.seed)
    engine = build_engine(cfg, model, num_steps)
    timers = Timers()
    install_timers(timers, recorder=False)
    t0 = time.perf_counter()
    for step in range(num_steps):
        for micro in range(t.grad_accum):
            b = data.micro_batch(step, micro)
            ids, mask, labels = (b[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
            start = time.perf_counter()
            loss = micro_batch_loss(engine, ids, mask, labels)
            timers.seconds["forward"] += time.perf_counter() - start
            engine.backward(loss)
            engine.step()
            loss.item()
    seconds = time.perf_counter() - t0
    if rank == 0:
        Path(loop["out"]).write_text(json.dumps({"seconds": {**timers.seconds, "all steps": seconds},
                                                 "calls": timers.calls}))
    ray.train.report({"seconds": seconds})


def torch_loop(cfg, run, threads: int) -> tuple[float, int]:
    """One process: the global batch of every step (the ranks' rows side by side), the model's
    optimizer at its lr, global-norm clipping at DeepSpeed's gradient_clipping."""
    import torch

    from rayattr.data import BatchPlan, load_tokenizer
    from rayattr.data.run_data import rank_tokens
    from rayattr.optim.spec import resolve_optimizer
    from rayattr.model.loss import micro_batch_loss
    from rayattr.model.build import build_model

    torch.set_num_threads(threads)
    t = cfg.train
    data = [rank_tokens(run, r) for r in range(t.ranks)]
    plan = BatchPlan(data[0].n_train, t.micro_batch, t.ranks, t.grad_accum, t.epochs, t.seed)
    num_steps = min(plan.num_steps, t.steps or plan.num_steps)
    model = build_model(cfg.model, load_tokenizer(cfg.data.tokenizer).vocab_size, cfg.data.seq_len, seed=t.seed)
    spec = resolve_optimizer(cfg)
    opt = (torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(spec.beta1, spec.beta2), eps=spec.eps,
                             weight_decay=spec.weight_decay) if spec.adamw
           else torch.optim.SGD(model.parameters(), lr=spec.lr))
    clip = float((t.deepspeed or {}).get("gradient_clipping", 1.0))
    batches = []
    for step in range(num_steps):  # read ahead: the loop times training, not parquet
        for micro in range(t.grad_accum):
            parts = [d.micro_batch(step, micro) for d in data]
            batches.append(tuple(torch.cat([p[k] for p in parts]) for k in ("input_ids", "attention_mask", "labels")))
    t0 = time.perf_counter()
    for i, (ids, mask, labels) in enumerate(batches):
        loss = micro_batch_loss(model, ids, mask, labels) / t.grad_accum
        loss.backward()
        if (i + 1) % t.grad_accum == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        loss.item()
    return time.perf_counter() - t0, num_steps


# ---------------------------------------------------------------------------- the driver

def new_run(cfg, run_id: str):
    from rayattr.pipeline.stages import start_run

    return start_run(cfg.with_overrides(run_id=run_id), connect_ray=True)


def fit(cfg, loop_fn, run, out: Path, storage: Path) -> tuple[float, dict]:
    """One gang of `loop_fn` on `run`: the fit's wall seconds and rank 0's timers."""
    from ray.train import RunConfig

    from rayattr.train.trainer import gang_trainer

    loop = {"config": cfg.to_dict(redact=False), "run": run.uri, "storage_options": None, "out": str(out)}
    t0 = time.perf_counter()
    gang_trainer(cfg, loop_fn, loop, RunConfig(name=out.stem, storage_path=str(storage))).fit()
    return time.perf_counter() - t0, json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sgd", action="store_true", help="plain SGD (jobs/configs/sgd.yaml); default: the built-in AdamW")
    p.add_argument("--large", action="store_true", help="GPT-2 4 layers x 256, global batch 8 x 128 tokens")
    p.add_argument("--set", action="append", default=[], metavar="KEY=YAML", help="config override, dotted")
    p.add_argument("--no-breakdown", action="store_true", help="skip the timed rank loop")
    args = p.parse_args()

    from rayattr.runtime.cluster import connect
    from rayattr.config import Config
    from rayattr.train.trainer import train

    settings = yaml.safe_load((ROOT / "jobs" / "configs" / "sgd.yaml").read_text()) if args.sgd else {}
    if args.large:
        settings = merge(settings, LARGE)
    settings = merge(settings, dotted(args.set))
    work = Path(tempfile.mkdtemp(prefix="rayattr-train-overhead-"))
    settings = merge(settings, {"store": {"uri": str(work / "store")}})
    cfg = Config.from_dict(settings).validate()
    connect(log_to_driver=False)

    t0 = time.perf_counter()
    run = new_run(cfg, "rayattr")
    info = train(cfg, run, progress=False)
    job = {"total": info["train_seconds"], "steps": info["step_seconds"]}
    print(f"rayattr train stage: {job['total']:.1f} s ({time.perf_counter() - t0:.1f} s with the data)", flush=True)

    ds_total, ds = fit(cfg, deepspeed_loop, run, work / "deepspeed.json", work / "ray")
    print(f"deepspeed loop: {ds_total:.1f} s", flush=True)
    breakdown = None
    if not args.no_breakdown:
        timed = new_run(cfg, "timed")
        _, breakdown = fit(cfg, timed_rank_loop, timed, work / "timed.json", work / "ray")
    plain, steps = torch_loop(cfg, run, threads=cfg.train.ranks)

    m = cfg.model
    print(f"\n{os.cpu_count()} CPUs; GPT-2 {m.n_layer} x {m.n_embd}, global batch {cfg.global_batch} x "
          f"{cfg.data.seq_len}, {steps} steps, {'SGD' if args.sgd else 'AdamW'}, "
          f"{cfg.train.ranks} ranks; runs in {work}")
    ds_steps = ds["seconds"]["all steps"]
    print(f"{'':34s} {'total s':>8s} {'start-up s':>10s} {'steps s':>8s} {'ms/step':>8s}")
    for name, total, st in (("rayattr train stage", job["total"], job["steps"]),
                            ("DeepSpeed gang, no recorder", ds_total, ds_steps),
                            ("plain torch, one process", plain, plain)):
        print(f"{name:34s} {total:8.1f} {total - st:10.1f} {st:8.1f} {1e3 * st / steps:8.1f}")
    print(f"\nsteps, rayattr / DeepSpeed without recorder: {job['steps'] / ds_steps:.2f}x")
    print(f"train stage minus start-up, rayattr / DeepSpeed without recorder (their steps): "
          f"{job['steps'] / ds_steps:.2f}x; whole stages: {job['total'] / ds_total:.2f}x")
    print(f"steps, rayattr / plain torch: {job['steps'] / plain:.2f}x; DeepSpeed / plain torch: {ds_steps / plain:.2f}x")
    if breakdown:
        print("\nper step on rank 0, ms (timed rank loop; collectives are inside the parts above them)")
        print(f"{'part':44s} {'rayattr':>8s} {'no recorder':>11s}")
        rows = dict(breakdown["seconds"])
        total = rows.pop("all steps")
        parts = sorted(rows, key=lambda k: (k.startswith("collective"), -rows[k]))
        for k in parts:
            print(f"{k:44s} {1e3 * rows[k] / steps:8.2f} {1e3 * ds['seconds'].get(k, 0.0) / steps:11.2f}")
        top = sum(v for k, v in rows.items() if not k.startswith("collective"))
        print(f"{'other (loop, hooks.call, ...)':44s} {1e3 * (total - top) / steps:8.2f}")
        print(f"{'all steps':44s} {1e3 * total / steps:8.2f} {1e3 * ds_steps / steps:11.2f}")


if __name__ == "__main__":
    main()
