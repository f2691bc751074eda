"""Driver side of training: gang-schedule one RankActor per DeepSpeed rank and step them together."""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm.auto import tqdm

from rayattr.config import Config
from rayattr.store import Run
from rayattr.train.backend import free_port, node_ip
from rayattr.train.worker import RankActor


@ray.remote(num_cpus=0)
def _rendezvous() -> tuple[str, int]:
    """Address and a free port on the node of rank 0 (runs inside its bundle)."""
    return node_ip(), free_port()


def rank_resources(cfg: Config) -> dict[str, float]:
    res = {"CPU": 1.0}
    if cfg.train.use_gpu:
        res["GPU"] = 1.0
    return res


def train(cfg: Config, run: Run, storage_options: dict | None = None, progress: bool = True,
          chunk_steps: int = 4) -> dict[str, Any]:
    """Train all steps with capture; returns the ranks' info and the mean losses per chunk."""
    world = cfg.train.ranks
    pg = placement_group([rank_resources(cfg) for _ in range(world)], strategy="PACK")
    ray.get(pg.ready(), timeout=600)
    try:
        on = lambda i: PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)  # noqa: E731
        addr, port = ray.get(_rendezvous.options(scheduling_strategy=on(0)).remote())
        res = rank_resources(cfg)
        actors = [RankActor.options(scheduling_strategy=on(r), num_cpus=res["CPU"], num_gpus=res.get("GPU", 0))
                  .remote(r, world, addr, port, cfg.to_dict(redact=False), run.uri, storage_options)
                  for r in range(world)]
        info = ray.get(actors[0].info.remote())
        run.update_manifest(layer_dims=info["layer_dims"], num_steps=info["num_steps"],
                            global_batch=info["global_batch"], steps_per_epoch=info["steps_per_epoch"])
        start = 0
        losses = []
        t0 = time.perf_counter()
        with tqdm(total=info["num_steps"], initial=start, desc="train", unit="step", disable=not progress) as bar:
            for a in range(start, info["num_steps"], chunk_steps):
                b = min(info["num_steps"], a + chunk_steps)
                out = ray.get([act.train_steps.remote(a, b) for act in actors])
                losses.append(out[0]["loss"])
                bar.update(b - a)
                bar.set_postfix(loss=f"{out[0]['loss']:.3f}")
        ray.get([act.finish.remote() for act in actors])
        info.update(losses=losses, train_seconds=time.perf_counter() - t0)
        for act in actors:
            ray.kill(act)
        return info
    finally:
        remove_placement_group(pg)
