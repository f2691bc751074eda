"""Driver side of retraining: as many retraining gangs as the cluster holds, fed from one queue.

Each gang is a Ray Train TorchTrainer with one worker per rank of the original run: Ray Train
places the ranks (ScalingConfig, the run's train.placement) and sets up their process group.
The gang's rank 0 takes the next counterfactual from a shared queue as soon as the gang has
finished one and hands it to the other ranks; each result goes back through a second queue to
the driver, which passes it to `on_result` at once (the caller writes it to the run), so an
interrupted validation keeps every retrain that finished.
"""

from __future__ import annotations

from collections.abc import Callable

import ray
from ray.util.queue import Empty, Queue
from tqdm.auto import tqdm

from rayattr.config import Config
from rayattr.store import Run
from rayattr.train.checkpoints import ray_train_storage
from rayattr.train.trainer import Fit, gang_trainer, rank_resources
from rayattr.validate.counterfactuals import Removal
from rayattr.store.layout import gang_dir

POLL_S = 0.5  # how often the driver looks at the gangs while no result comes


def default_gangs(cfg: Config) -> int:
    """Gangs that fit in the cluster at once (each holds one CPU/GPU per rank)."""
    res = ray.cluster_resources()
    per_gang = {k: v * cfg.train.ranks for k, v in rank_resources(cfg).items()}
    return max(1, int(min(res.get(k, 0) // v for k, v in per_gang.items())))


def gang_loop(loop: dict) -> None:
    """One Ray Train worker of a gang: retrain what rank 0 takes from the queue until it is empty."""
    import ray.train
    import torch
    import torch.distributed as dist

    from rayattr.validate.retrain import RetrainWorker

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    worker = RetrainWorker(rank, world, loop["config"], loop["run"], loop["storage_options"])
    todo, results = loop["todo"], loop["results"]
    while True:
        box = [None]
        if rank == 0:
            try:
                box[0] = todo.get(block=False)
            except Empty:
                pass
        dist.broadcast_object_list(box, src=0)  # every rank retrains the same counterfactual, or stops
        if box[0] is None:
            return
        out = worker.retrain(box[0])
        removed = torch.tensor([out["removed"]], dtype=torch.int64)
        dist.all_reduce(removed)  # each rank removed its own rows' occurrences
        if rank == 0:
            results.put((box[0], {**out, "removed": int(removed.item())}))


def _gang(cfg: Config, run: Run, storage_options: dict | None, todo: Queue, results: Queue, index: int):
    from ray.train import FailureConfig, RunConfig

    loop = {"config": cfg.to_dict(redact=False), "run": run.uri, "storage_options": storage_options,
            "todo": todo, "results": results}
    # a failed retrain is not retried: the validation stops, and a rerun keeps what finished
    return gang_trainer(cfg, gang_loop, loop, RunConfig(**ray_train_storage(run, gang_dir(index)),
                                                       failure_config=FailureConfig(max_failures=0)))


def retrain_all(cfg: Config, run: Run, removals: list[Removal], on_result: Callable[[Removal, dict], None],
                gangs: int | None = None, storage_options: dict | None = None, progress: bool = True) -> None:
    """Retrain every removal, `gangs` at a time (default: as many as fit)."""
    if not removals:
        return
    n = min(len(removals), gangs or default_gangs(cfg))
    todo, results = Queue(), Queue()
    for r in removals:
        todo.put(r.to_dict())
    fits = [Fit(_gang(cfg, run, storage_options, todo, results, i)) for i in range(n)]
    left = len(removals)
    try:
        with tqdm(total=left, desc="retrain", unit="run", disable=not progress) as bar:
            while left:
                try:
                    removal, out = results.get(timeout=POLL_S)
                except Empty:
                    if _gangs_ended(fits) and results.empty():
                        raise RuntimeError(f"the retraining gangs ended with {left} retrains unreported")
                    continue
                on_result(Removal.from_dict(removal), out)
                bar.update(1)
                left -= 1
        for f in fits:
            f.result()
    finally:
        for q in (todo, results):
            q.shutdown()


def _gangs_ended(fits: list[Fit]) -> bool:
    """Raise a gang's failure as soon as it happens; True once every gang has ended."""
    done = [f for f in fits if f.wait(0)]
    for f in done:
        f.result()  # raises the gang's error
    return len(done) == len(fits)
