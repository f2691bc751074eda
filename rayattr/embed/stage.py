"""Driver side of the embedding stage: one SegmentActor per segment, all concurrent."""

from __future__ import annotations

import math
from typing import Any

import ray
from tqdm.auto import tqdm

from rayattr.dvemb import segment_bounds
from rayattr.embed.segment import SegmentActor, SegmentSpec


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


def start_segments(run_uri: str, storage_options: dict | None, num_steps: int, n_segments: int,
                   edges: list[int], curvature: bool, keep_sample_embeddings: bool,
                   use_gpu: bool = False, dtype: str = "float32", error_blocks: int = 2,
                   updates: bool = False, momentum: float = 0.0) -> tuple[list, list[SegmentSpec]]:
    """One actor per segment; `updates` and `momentum` (Adam's β₁) for an AdamW run."""
    bounds = segment_bounds(num_steps, n_segments)
    specs = [SegmentSpec(i, a, b) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    # a crashed actor is restarted and its method retried: compute() skips finished work
    # SPREAD: on a multi-node cluster the segments' reads and matmuls go to different nodes
    opts = dict(**actor_resources(n_segments, use_gpu), max_restarts=3, max_task_retries=3,
                scheduling_strategy="SPREAD")
    actors = [SegmentActor.options(**opts).remote(run_uri, storage_options, s, edges, curvature, dtype,
                                                  keep_sample_embeddings=keep_sample_embeddings,
                                                  error_blocks=error_blocks, updates=updates, momentum=momentum)
              for s in specs]
    return actors, specs


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
