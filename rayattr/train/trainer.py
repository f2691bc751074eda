"""Driver side of training: one Ray Train TorchTrainer worker per DeepSpeed rank.

Ray Train places the ranks (ScalingConfig: workers, GPUs, placement strategy), sets up their
process group and, when a rank dies, restarts every rank (FailureConfig.max_failures =
train.max_restarts): the new ranks load Ray Train's latest checkpoint, which it keeps in the
run (rayattr/train/checkpoints.py), and skip writing what the store already holds (Recorder),
so no step is missing or duplicated. A new driver on the same run resumes from it too. The ranks
call `ray.train.report` only with a checkpoint and once at the end: each report is a barrier
through Ray Train's controller, seconds long on a small model. Rank 0 says how far it got in
`train/progress.json` of the run, written in the background (rayattr/train/progress.py), which
the driver follows for its progress bar. `rank_resources` and `Fit` serve `rayattr validate`'s retraining
gangs too (rayattr/validate/gangs.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from tqdm.auto import tqdm

from rayattr.runtime import hooks
from rayattr.config import Config
from rayattr.store import Run
from rayattr.train import checkpoints
from rayattr.store.layout import TRAIN_PROGRESS
from rayattr.train.progress import ProgressWriter
from rayattr.train.worker import NonFiniteLoss

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often the driver reads the progress file


def rank_resources(cfg: Config) -> dict[str, float]:
    res = {"CPU": 1.0}
    if cfg.train.use_gpu:
        res["GPU"] = 1.0
    return res


def gang_trainer(cfg: Config, loop_fn, loop_config: dict, run_config):
    """A TorchTrainer with one worker per rank of `cfg` (its resources, placement and process
    group backend): the training gang, and each of `rayattr validate`'s retraining gangs."""
    from ray.train import LoggingConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    # Ray Train's INFO lines (worker group started, process group set up, one line per
    # ray.train.report) say nothing a user acts on; its warnings and errors still show
    run_config.logging_config = LoggingConfig(log_level="WARNING")
    return TorchTrainer(
        loop_fn, train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.ranks, use_gpu=t.use_gpu, resources_per_worker=rank_resources(cfg),
                                     placement_strategy=t.placement),
        run_config=run_config)


def rank_loop(loop: dict) -> None:
    """One Ray Train worker: a RankWorker over the process group Ray Train set up."""
    import ray.train
    import torch.distributed as dist

    from rayattr.train.worker import RankWorker

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    worker = RankWorker(rank, world, loop["config"], loop["run"], loop["storage_options"])
    info = worker.info()
    infos: list = [None] * world
    dist.all_gather_object(infos, info)
    start = info["start_step"]
    if any(i["start_step"] != start for i in infos):
        raise RuntimeError(f"ranks resumed from different checkpoints: {[i['start_step'] for i in infos]}")
    run = worker.run
    progress = None
    if rank == 0:
        attempt = (run.read_json(TRAIN_PROGRESS)["attempt"] + 1) if run.exists(TRAIN_PROGRESS) else 0
        run.update_manifest(layer_dims=info["layer_dims"], num_steps=info["num_steps"],
                            global_batch=info["global_batch"], steps_per_epoch=info["steps_per_epoch"],
                            rank_nodes=[i["node"] for i in infos], n_truncated=info["truncated"])
        progress = ProgressWriter(run, {"attempt": attempt, "start": start, "step": start, "loss": None})
    try:
        out = worker.train_steps(start, info["num_steps"], on_step=progress.post if progress else None)
    except NonFiniteLoss as err:  # every rank stops at the same step; a restart cannot help
        if rank == 0:
            run.update_manifest(train_error=str(err))
        return
    finally:
        if progress is not None:
            progress.close()
    worker.finish()
    ray.train.report({"step": info["num_steps"], "loss": out["loss"]})


def train(cfg: Config, run: Run, storage_options: dict | None = None, progress: bool = True) -> dict[str, Any]:
    """Train all steps with capture (resuming a partial run); returns the ranks' info and losses,
    the seconds of the whole stage and, of those, the last attempt's steps on rank 0."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    if run.exists(TRAIN_PROGRESS):  # attempts count within this call
        run.write_json(TRAIN_PROGRESS, {**run.read_json(TRAIN_PROGRESS), "attempt": -1})
    run.update_manifest(train_error=None)
    t = cfg.train
    trainer = gang_trainer(
        cfg, rank_loop,
        {"config": cfg.to_dict(redact=False), "run": run.uri, "storage_options": storage_options},
        # Ray Train's storage is the run: its checkpoints resume a restarted gang or a new driver
        RunConfig(**checkpoints.storage(run), checkpoint_config=CheckpointConfig(num_to_keep=checkpoints.KEEP),
                  failure_config=FailureConfig(max_failures=t.max_restarts)))
    t0 = time.perf_counter()
    fit = Fit(trainer)
    losses = _follow(run, fit, progress)
    fit.result()  # a training failure beyond train.max_restarts raises here
    m = run.reload_manifest()
    if m.get("train_error"):
        raise NonFiniteLoss(m["train_error"])
    state = run.read_json(TRAIN_PROGRESS)
    return {"num_steps": m["num_steps"], "layer_dims": m["layer_dims"], "global_batch": m["global_batch"],
            "losses": losses, "train_seconds": time.perf_counter() - t0, "resumed_from": state["start"],
            "restarts": state["attempt"], "step_seconds": state.get("seconds")}


class Fit:
    """trainer.fit() running in a thread of the driver, so the driver can follow progress.

    A thread, not a Ray task: a task would be one more worker process (Ray Train's own
    start-up again, about 5 s of a 2-CPU machine per gang) for what is a wait on Ray Train's
    controller actor, which is where the work happens."""

    def __init__(self, trainer) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fit, args=(trainer,), name="ray-train-fit", daemon=True)
        _watcher_off()
        self._thread.start()

    def _fit(self, trainer) -> None:
        try:
            trainer.fit()
        except BaseException as err:  # noqa: BLE001 - raised again in the driver's thread by result()
            self._error = err

    def wait(self, timeout: float | None = None) -> bool:
        """Whether fit has returned, waiting at most `timeout` seconds for it."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def result(self) -> None:
        """Wait for fit; raise what it raised (a failure beyond train.max_restarts)."""
        self.wait()
        if self._error is not None:
            raise self._error


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def _watcher_off() -> None:
    """Ray Train's preemption watcher off unless the user set it: a restarted gang resumes from
    its checkpoint either way (FailureConfig), and the watcher's actor makes Ray log an
    error-level line on every start ("PreemptionWatcher ... max_restarts > 0") that is no error.
    Ray Train passes the variable from the driver's environment to its controller."""
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")


def _follow(run: Run, fit: Fit, progress: bool) -> list[float]:
    """Follow the ranks' progress until fit returns: the progress bar, the losses it saw,
    a note per restart, and the driver's test seam."""
    losses: list[float] = []
    seen = (None, None)
    bar = None  # made at the first step seen: its rate and estimate count from there, not from the start-up

    def show(state: dict) -> None:
        nonlocal bar
        if bar is None:
            total = run.manifest.get("num_steps") or run.reload_manifest().get("num_steps")
            bar = tqdm(desc="train", unit="step", total=total, initial=state["step"], disable=not progress)
        bar.update(state["step"] - bar.n)
        bar.set_postfix(loss=f"{state['loss']:.3f}")

    def observe() -> None:
        nonlocal seen
        state = run.read_json(TRAIN_PROGRESS) if run.exists(TRAIN_PROGRESS) else None
        if state is None or state.get("attempt", -1) < 0 or (state["attempt"], state["step"]) == seen:
            return
        if seen[0] is not None and state["attempt"] != seen[0]:
            log.warning("training rank failed; restarting from the last checkpoint (step %d, restart %d)",
                        state["start"], state["attempt"])
        seen = (state["attempt"], state["step"])
        if state["loss"] is not None:
            losses.append(state["loss"])
            show(state)
            hooks.call("driver.train", step=state["step"])  # test seam: empty in production

    try:
        while not fit.wait(POLL_S):
            observe()
        observe()  # the last chunk, when fit returned between two looks
    finally:
        if bar is not None:
            bar.close()
    return losses
