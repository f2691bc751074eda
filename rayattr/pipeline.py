"""The whole run, stage by stage: data -> train (rank actors) -> embed (segment actors) -> reduce.

Each stage reads and writes only the run in the store; the driver passes small things
(K suffix products, the validation gradient) between them.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from rayattr.capture import ProjectionSpec
from rayattr.config import Config
from rayattr.data import builtin_corpus, load_dataset
from rayattr.embed.stage import default_segments, start_segments, wait_all
from rayattr.reduce import chain_segments, phase_edges, validation_gradient, write_outputs
from rayattr.store import Run, StoreOptions
from rayattr.train import train


@dataclass
class RunResult:
    """What a finished run reports."""

    uri: str
    """The run's URI in the store."""
    timings: dict[str, float] = field(default_factory=dict)
    """Wall seconds per stage."""
    sources: list[dict[str, Any]] = field(default_factory=list)
    """Rows of values/sources.parquet, best value per sample first."""
    segments: int = 0
    num_steps: int = 0


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("run-%Y%m%d-%H%M%S")


def prepare_data(cfg: Config, options: StoreOptions):
    d = cfg.data
    if d.train is None:
        b = d.builtin
        return builtin_corpus(n_train=b.n_train, n_validation=b.n_validation,
                              corrupted_fraction=b.corrupted_fraction, seed=cfg.train.seed, max_chars=b.max_chars)
    so = options.storage_options or None
    return load_dataset(d.train, storage_options=so), load_dataset(d.validation, storage_options=so)


def run_pipeline(cfg: Config, progress: bool = True) -> RunResult:
    cfg.validate()
    options = StoreOptions(storage_options=cfg.store.storage_options)
    so = cfg.store.storage_options or None
    timings: dict[str, float] = {}
    t = time.perf_counter()
    run_id = cfg.run_id or new_run_id()
    spec = ProjectionSpec(rank=cfg.capture.rank, seed=cfg.capture.seed, kind=cfg.capture.kind)
    manifest = {"config": cfg.to_dict(), "projection": spec.to_dict(), "world_size": cfg.train.ranks,
                "model": {"family": cfg.model.family, "factory": cfg.model.factory}}
    train_table, val_table = prepare_data(cfg, options)
    run = Run.create(cfg.store.uri, run_id, manifest, options=options)
    run.write_table("data/train.parquet", train_table)
    run.write_table("data/validation.parquet", val_table)
    timings["data"] = time.perf_counter() - t

    t = time.perf_counter()
    run.update_manifest(status="training")
    info = train(cfg, run, so, progress=progress)
    timings["train"] = time.perf_counter() - t

    result = attribute(cfg, run, info["num_steps"], progress=progress)
    result.timings = {**timings, **result.timings}
    run.update_manifest(timings=result.timings)
    return result


def attribute(cfg: Config, run: Run, num_steps: int, segments: int | None = None,
              progress: bool = True) -> RunResult:
    """Embedding and reduce stages on a trained run: segment actors, K chain, values."""
    so = cfg.store.storage_options or None
    timings: dict[str, float] = {}
    t = time.perf_counter()
    run.update_manifest(status="embedding")
    n_seg = min(num_steps, segments or cfg.embed.segments or default_segments(cfg.train.use_gpu))
    edges = phase_edges(num_steps, cfg.embed.phases)
    # the test side needs only the final weights: start it before the segment actors take the CPUs
    val_ref = _validation_gradient.remote(run.uri, so)
    actors, _ = start_segments(run.uri, so, num_steps, n_seg, edges, cfg.capture.curvature == "sampled",
                               cfg.embed.keep_sample_embeddings, cfg.train.use_gpu, cfg.embed.dtype)
    wait_all([a.compute.remote() for a in actors], "embed", progress)
    timings["embed"] = time.perf_counter() - t

    t = time.perf_counter()
    run.update_manifest(status="reducing")
    suffixes = chain_segments(run, n_seg)
    val_grad = ray.get(val_ref)
    wait_all([a.finalize.remote(ray.put(S), val_grad) for a, S in zip(actors, suffixes)], "finalize", progress)
    out = write_outputs(run, n_seg, edges, val_grad)
    for a in actors:
        ray.kill(a)
    timings["reduce"] = time.perf_counter() - t
    run.update_manifest(status="done", segments=n_seg, phase_edges=edges,
                        finished=dt.datetime.now(dt.timezone.utc).isoformat())
    return RunResult(uri=run.uri, timings=timings, sources=out["sources"], segments=n_seg, num_steps=num_steps)


@ray.remote(num_cpus=1)
def _validation_gradient(run_uri: str, storage_options: dict | None):
    run = Run.open_uri(run_uri, options=StoreOptions(storage_options=storage_options or {}))
    return validation_gradient(run)
