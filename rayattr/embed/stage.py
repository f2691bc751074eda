"""Driver side of the embedding stage: one SegmentActor per segment, all concurrent."""

from __future__ import annotations

import logging
import math
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm.auto import tqdm

from rayattr.math.dvemb import segment_bounds
from rayattr.embed.segment import SegmentActor, SegmentSpec

log = logging.getLogger(__name__)

# how long the segments wait for one node each before settling for a SPREAD hint
PLACEMENT_TIMEOUT_S = 120.0


def default_segments(use_gpu: bool = False) -> int:
    res = ray.cluster_resources()  # totals: the training actors may still be releasing theirs
    return max(1, int(res.get("GPU" if use_gpu else "CPU", 1)))


def actor_resources(n_segments: int, use_gpu: bool = False) -> dict[str, float]:
    """One CPU (GPU) per segment actor, or an equal share when there are more segments than
    devices: every actor must be alive at once, since finalize() runs on all of them."""
    res = ray.cluster_resources()
    key = "GPU" if use_gpu else "CPU"
    share = min(1.0, math.floor(res.get(key, 1) / n_segments * 1000) / 1000)
    if share <= 0:
        raise ValueError(f"{n_segments} segments need {key}s, and the cluster has none")
    return {"num_cpus": share if not use_gpu else 0, "num_gpus": share if use_gpu else 0}


def nodes_that_fit(resources: dict[str, float], use_gpu: bool = False) -> int:
    """Alive nodes whose total CPUs (GPUs) can hold one segment actor: a head node started
    with --num-cpus=0 does not count."""
    key, need = ("GPU", resources["num_gpus"]) if use_gpu else ("CPU", resources["num_cpus"])
    return sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(key, 0) >= need)


def segment_placement(n_segments: int, resources: dict[str, float], use_gpu: bool = False,
                      timeout_s: float = PLACEMENT_TIMEOUT_S):
    """A STRICT_SPREAD placement group, one bundle per segment, when the cluster has a node for
    each: the segments' reads and matmuls then run on different nodes for certain, where a
    SPREAD hint gives way whenever one node is still busy (the training ranks releasing their
    CPUs, the validation-gradient task). None when there are more segments than nodes, or when
    the group cannot be placed in `timeout_s`; the actors are then only SPREAD."""
    if n_segments < 2 or nodes_that_fit(resources, use_gpu) < n_segments:
        return None
    bundle = {"GPU": resources["num_gpus"]} if use_gpu else {"CPU": resources["num_cpus"]}
    pg = placement_group([dict(bundle) for _ in range(n_segments)], strategy="STRICT_SPREAD")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if ready:
        return pg
    remove_placement_group(pg)
    log.warning("the %d segment actors could not be placed one per node within %.0f s; they are spread "
                "as resources allow", n_segments, timeout_s)
    return None


def start_segments(run_uri: str, storage_options: dict | None, num_steps: int, n_segments: int,
                   edges: list[int], curvature: bool, keep_sample_embeddings: bool,
                   use_gpu: bool = False, dtype: str = "float32", error_blocks: int = 2,
                   updates: bool = False, momentum: float = 0.0, beta2: float = 0.0,
                   clip_response: bool = False, momentum_curvature: bool = False, cut_unstable: bool = False
                   ) -> tuple[list, list[SegmentSpec], Any]:
    """One actor per segment; `updates` and `momentum` (Adam's β₁) for an AdamW run, `beta2`
    (Adam's β₂) when it recorded v's response rows (0: v frozen), `momentum_curvature` for K's
    curvature through the momentum (embed.momentum_curvature), `cut_unstable` for embed.unstable "cut". Returns the
    actors, their step ranges and their placement group (None if SPREAD only), which the
    caller removes with the actors."""
    bounds = segment_bounds(num_steps, n_segments)
    specs = [SegmentSpec(i, a, b) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    resources = actor_resources(n_segments, use_gpu)
    pg = segment_placement(n_segments, resources, use_gpu)

    def where(i: int):
        if pg is None:  # on a multi-node cluster the segments still go to different nodes if they can
            return "SPREAD"
        return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)

    # a crashed actor is restarted (in its bundle) and its method retried: compute() skips finished work
    actors = [SegmentActor.options(**resources, max_restarts=3, max_task_retries=3, scheduling_strategy=where(i))
              .remote(run_uri, storage_options, s, edges, curvature, dtype,
                      keep_sample_embeddings=keep_sample_embeddings,
                      error_blocks=error_blocks, updates=updates, momentum=momentum, beta2=beta2,
                      clip_response=clip_response, momentum_curvature=momentum_curvature,
                      cut_unstable=cut_unstable)
              for i, s in enumerate(specs)]
    return actors, specs, pg


def stop_segments(actors: list, pg) -> None:
    for a in actors:
        ray.kill(a)
    if pg is not None:
        remove_placement_group(pg)


def wait_all(refs: list, desc: str, progress: bool = True) -> list[Any]:
    """ray.get with a progress bar that advances as each segment finishes."""
    pending, index = list(refs), {r: i for i, r in enumerate(refs)}
    out: list[Any] = [None] * len(refs)
    with tqdm(total=len(refs), desc=desc, unit="segment", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            out[index[done[0]]] = ray.get(done[0])
            bar.update(1)
    return out
