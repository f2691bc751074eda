"""Driver side of retraining: as many retraining gangs as the cluster holds, fed from one queue.

Each gang is one RetrainActor per rank of the original run, in its own placement group. A
gang takes the next counterfactual as soon as it finishes one; each result is handed to
`on_result` at once (the caller writes it to the run), so an interrupted validation keeps
every retrain that finished.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm.auto import tqdm

from rayattr.config import Config
from rayattr.store import Run
from rayattr.train.trainer import _rendezvous, gather, rank_resources
from rayattr.validate.counterfactuals import Removal
from rayattr.validate.retrain import RetrainActor


def default_gangs(cfg: Config) -> int:
    """Gangs that fit in the cluster at once (each holds one CPU/GPU per rank)."""
    res = ray.cluster_resources()
    per_gang = {k: v * cfg.train.ranks for k, v in rank_resources(cfg).items()}
    return max(1, int(min(res.get(k, 0) // v for k, v in per_gang.items())))


class _Gang:
    def __init__(self, cfg: Config, run: Run, storage_options: dict | None):
        world = cfg.train.ranks
        self.pg = placement_group([rank_resources(cfg) for _ in range(world)], strategy=cfg.train.placement)
        ray.get(self.pg.ready(), timeout=600)
        on = lambda i: PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)  # noqa: E731
        addr, port = ray.get(_rendezvous.options(scheduling_strategy=on(0)).remote())
        res = rank_resources(cfg)
        self.actors = [RetrainActor.options(scheduling_strategy=on(r), num_cpus=res["CPU"], num_gpus=res.get("GPU", 0))
                       .remote(r, world, addr, port, cfg.to_dict(redact=False), run.uri, storage_options)
                       for r in range(world)]
        self.refs: list = []
        self.removal: Removal | None = None

    def submit(self, removal: Removal) -> Any:
        self.removal = removal
        self.refs = [a.retrain.remote(removal.to_dict()) for a in self.actors]
        return self.refs[0]

    def result(self) -> dict[str, Any]:
        out = gather(self.refs)
        first = dict(out[0])
        first["removed"] = sum(o["removed"] for o in out)
        return first

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)


def retrain_all(cfg: Config, run: Run, removals: list[Removal], on_result: Callable[[Removal, dict], None],
                gangs: int | None = None, storage_options: dict | None = None, progress: bool = True) -> None:
    """Retrain every removal, `gangs` at a time (default: as many as fit)."""
    if not removals:
        return
    n = min(len(removals), gangs or default_gangs(cfg))
    queue = list(removals)
    crew = [_Gang(cfg, run, storage_options) for _ in range(n)]
    try:
        running = {g.submit(queue.pop(0)): g for g in crew if queue}
        with tqdm(total=len(removals), desc="retrain", unit="run", disable=not progress) as bar:
            while running:
                done, _ = ray.wait(list(running), num_returns=1)
                gang = running.pop(done[0])
                on_result(gang.removal, gang.result())
                bar.update(1)
                if queue:
                    running[gang.submit(queue.pop(0))] = gang
    finally:
        for g in crew:
            g.close()
