"""Driver side of training: gang-schedule one RankActor per DeepSpeed rank and step them together.

If a rank actor dies, every rank is stopped (a DeepSpeed job cannot lose a member) and the
gang is started again: the new ranks load the last complete checkpoint and skip writing what
the store already holds (Recorder), up to `train.max_restarts` times.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm.auto import tqdm

from rayattr import hooks
from rayattr.config import Config
from rayattr.store import Run
from rayattr.train.backend import free_port, node_ip
from rayattr.train.worker import NonFiniteLoss, RankActor

log = logging.getLogger(__name__)

# Seconds the other ranks get to commit what they hold after one reports a non-finite loss.
FATAL_GRACE_S = 120.0


@ray.remote(num_cpus=0)
def _rendezvous() -> tuple[str, int]:
    """Address and a free port on the node of rank 0 (runs inside its bundle)."""
    return node_ip(), free_port()


def rank_resources(cfg: Config) -> dict[str, float]:
    res = {"CPU": 1.0}
    if cfg.train.use_gpu:
        res["GPU"] = 1.0
    return res


def gather(refs: list) -> list[Any]:
    """ray.get of all refs, raising the first failure as soon as it happens (not in list order:
    a surviving rank may block in a collective forever after its peer died)."""
    index = {r: i for i, r in enumerate(refs)}
    out: list[Any] = [None] * len(refs)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            out[index[done[0]]] = ray.get(done[0])
        except RayTaskError as err:
            if pending and _fatal(err) is not None:
                # all ranks stop at the same non-finite step and commit what they hold: let the
                # others finish that before the gang is torn down
                ray.wait(pending, num_returns=len(pending), timeout=FATAL_GRACE_S)
            raise
    return out


def _fatal(err: Exception) -> Exception | None:
    """The user-facing error inside a task failure that a restart cannot fix, else None."""
    cause = getattr(err, "cause", None) if isinstance(err, RayTaskError) else None
    return cause if isinstance(cause, NonFiniteLoss) else None


def train(cfg: Config, run: Run, storage_options: dict | None = None, progress: bool = True,
          chunk_steps: int = 4) -> dict[str, Any]:
    """Train all steps with capture (resuming a partial run); returns the ranks' info and losses."""
    restarts = 0
    while True:
        try:
            info = _train_gang(cfg, run, storage_options, progress, chunk_steps)
            info["restarts"] = restarts
            return info
        except (RayActorError, RayTaskError) as err:
            fatal = _fatal(err)
            if fatal is not None:
                raise fatal from None
            if restarts >= cfg.train.max_restarts:
                raise
            restarts += 1
            log.warning("training rank failed (%s); restart %d of %d from the last checkpoint",
                        type(err).__name__, restarts, cfg.train.max_restarts)
            print(f"training rank failed ({type(err).__name__}); restarting from the last checkpoint "
                  f"({restarts}/{cfg.train.max_restarts})", flush=True)


def _train_gang(cfg: Config, run: Run, storage_options: dict | None, progress: bool,
                chunk_steps: int) -> dict[str, Any]:
    world = cfg.train.ranks
    pg = placement_group([rank_resources(cfg) for _ in range(world)], strategy=cfg.train.placement)
    ray.get(pg.ready(), timeout=600)
    actors = []
    try:
        on = lambda i: PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)  # noqa: E731
        addr, port = ray.get(_rendezvous.options(scheduling_strategy=on(0)).remote())
        res = rank_resources(cfg)
        actors = [RankActor.options(scheduling_strategy=on(r), num_cpus=res["CPU"], num_gpus=res.get("GPU", 0))
                  .remote(r, world, addr, port, cfg.to_dict(redact=False), run.uri, storage_options)
                  for r in range(world)]
        infos = gather([a.info.remote() for a in actors])
        info = infos[0]
        start = info["start_step"]
        if any(i["start_step"] != start for i in infos):
            raise RuntimeError(f"ranks resumed from different checkpoints: {[i['start_step'] for i in infos]}")
        run.update_manifest(layer_dims=info["layer_dims"], num_steps=info["num_steps"],
                            global_batch=info["global_batch"], steps_per_epoch=info["steps_per_epoch"],
                            rank_nodes=[i["node"] for i in infos], n_truncated=info["truncated"])
        losses = []
        t0 = time.perf_counter()
        with tqdm(total=info["num_steps"], initial=start, desc="train", unit="step", disable=not progress) as bar:
            for a in range(start, info["num_steps"], chunk_steps):
                b = min(info["num_steps"], a + chunk_steps)
                out = gather([act.train_steps.remote(a, b) for act in actors])
                losses.append(out[0]["loss"])
                bar.update(b - a)
                bar.set_postfix(loss=f"{out[0]['loss']:.3f}")
                hooks.call("driver.train", step=b)  # test seam: empty in production
        gather([act.finish.remote() for act in actors])
        info.update(losses=losses, train_seconds=time.perf_counter() - t0, resumed_from=start)
        return info
    finally:
        for act in actors:
            ray.kill(act)
        remove_placement_group(pg)
