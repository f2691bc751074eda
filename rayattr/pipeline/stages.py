"""The whole run, stage by stage: data -> train (rank actors) -> embed (segment actors) -> reduce.

Each stage reads and writes only the run in the store; the driver passes only object refs
between them (the segments chain their K's among themselves, docs/method.md §4).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from rayattr.record import projection_spec
from rayattr.config import Config, ConfigError
from rayattr.data import run_data
from rayattr.data.run_data import PreparedData
from rayattr.embed.blocks import ProjectionBlocks
from rayattr.embed.cut import choose_segments, record_choice
from rayattr.embed.guard import (ETA_LAMBDA_WARN, WHOSE_H, DivergenceError, clipping_note, describe, eta_lambda_name,
                               stability_edge)
from rayattr.store.layout import CARRIED_KIND, FINAL_KIND, FINAL_WEIGHTS, LOCAL_KIND, SOURCE_VALUES
from rayattr.embed.stage import default_segments, start_segments, stop_segments, wait_all
from rayattr.optim.spec import resolve_optimizer
from rayattr.math.dvemb import segment_bounds, suffix_scan
from rayattr.reduce import write_outputs
from rayattr.store import Run, StoreOptions, open_run_ref
from rayattr.store.layout import RECORDS_KIND
from rayattr.store.registrations import TRAINING_KINDS as WRITTEN_IN_TRAINING
from rayattr.store.lease import driver_lease
from rayattr.store.storage import Storage
from rayattr.record.errors import NonFiniteLoss
from rayattr.train.trainer import train
from rayattr.model.build import check_model

log = logging.getLogger(__name__)


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


def prepare_data(cfg: Config, options: StoreOptions, connect_ray: bool = True) -> PreparedData:
    """The data checked and the trained steps tokenised by a Ray Data pipeline on the cluster
    (rayattr/data/stage.py, data.stage); joins Ray first if this process has not. connect_ray=False
    and no Ray in this process, or data.stage in the driver: the same steps run here."""
    so = options.storage_options or None
    files = run_data.check_files(cfg, so)  # missing files, columns, types: said before Ray starts
    if not ray.is_initialized() and connect_ray:
        from rayattr.runtime.cluster import connect

        connect()
    return run_data.prepare(cfg, so, on_ray=ray.is_initialized() and cfg.data.on_cluster, files=files)


def create_run(cfg: Config) -> Run:
    """The empty run in the store whose manifest holds the full, replayable config: start_run's
    step after the data is checked (benches call it to skip the data stage's checks)."""
    options = StoreOptions(storage_options=cfg.store.storage_options)
    manifest = {"config": cfg.to_dict(), "projection": projection_spec(cfg).to_dict(), "world_size": cfg.train.ranks,
                "model": {"family": cfg.model.family, "factory": cfg.model.factory},
                "model_family": cfg.model.factory or cfg.model.family}
    return Run.create(cfg.store.uri, cfg.run_id or new_run_id(), manifest, options=options)


def write_data(cfg: Config, run: Run, prepared: PreparedData | None = None) -> float:
    """The run's data (validation set, training texts or where they are, token shards) into the
    run, and its counts into the manifest; returns the seconds it took."""
    t = time.perf_counter()
    fields = run_data.write(run, prepared or prepare_data(cfg, run.options))
    run.update_manifest(**fields)
    return time.perf_counter() - t


def start_run(cfg: Config, connect_ray: bool = False) -> Run:
    """The one way to make a new run (public as rayattr.new_run, for a user's own training loop;
    the built-in job calls it with connect_ray=True). Check and tokenise the data, then create
    the run holding it: bad data or an unreachable store fail here, before the run exists and
    before any training starts. The data stage runs on Ray Data when this process has Ray
    (connect_ray: joins it first), else in this process."""
    cfg.validate()
    resolve_optimizer(cfg)  # the optimizer and the capture that goes with it
    check_model(cfg.model)  # the factory loads, model.extra's keys are known: in the driver
    options = StoreOptions(storage_options=cfg.store.storage_options)
    Storage(cfg.store.uri, options).probe(create_bucket=options.create_bucket)  # before Ray starts
    t = time.perf_counter()
    prepared = prepare_data(cfg, options, connect_ray)
    try:
        run = create_run(cfg)
    except BaseException:
        prepared.cleanup()
        raise
    seconds = time.perf_counter() - t + write_data(cfg, run, prepared)
    run.update_manifest(timings={"data": seconds})
    return run


def run_pipeline(cfg: Config, progress: bool = True) -> RunResult:
    """Every stage of a new run: data, training, embedding, reduce."""
    return complete_run(cfg, start_run(cfg, connect_ray=True), progress)


# Keys a resumed run may change: where the store is, how many restarts, where actors go.
RESUMABLE_KEYS = ("run_id", "store", "train.max_restarts", "train.placement", "embed.segments")


def open_for_resume(ref: str, given: Config | None, store: str | None = None,
                    storage_options: dict | None = None) -> tuple[Config, Run]:
    """The recorded config and the run named by `ref` (a run id under the store, or a run URI),
    opened in "resume" mode. It exists beside open_run_ref because a resume must also reconcile
    the config given now with the recorded one.

    `given` (from --config and overrides) must agree with the recorded config except in
    RESUMABLE_KEYS: resuming with other settings would splice two different trajectories.
    """
    root = store or (given.store.uri if given else Config().store.uri)
    so = storage_options if storage_options is not None else (given.store.storage_options if given else {})
    options = StoreOptions(storage_options=so)
    run = open_run_ref(ref, options=options, mode="resume", store=root)
    recorded = Config.from_dict(run.manifest["config"])
    if given is not None:
        diff = recorded.differences(given, ignore=RESUMABLE_KEYS)
        if diff:
            raise ConfigError(f"--resume {ref}: the run was made with a different config; "
                              f"differing keys (recorded != given): {'; '.join(diff)}")
        seg = run.manifest.get("segments")
        if given.embed.segments is not None and seg is not None and given.embed.segments != seg:
            raise ConfigError(f"--resume {ref}: embedding started with {seg} segments; "
                              f"cannot switch to {given.embed.segments}")
    cfg = recorded.with_overrides(**{"store.uri": run.uri.rsplit("/", 1)[0], "run_id": run.run_id})
    cfg.store.storage_options = dict(so or {})
    if given is not None:
        cfg.train.max_restarts, cfg.train.placement = given.train.max_restarts, given.train.placement
        cfg.embed.segments = given.embed.segments or cfg.embed.segments
    resolve_optimizer(cfg.validate())
    return cfg, run


def complete_run(cfg: Config, run: Run, progress: bool = True) -> RunResult:
    """The stages a run has not finished yet, in order; each finished stage is skipped.

    A new run goes through all of them; a resumed one (driver killed) goes on where its store
    says it stopped: training restarts from its last checkpoint, segments whose K is written
    are not recomputed. The run's driver lease is held throughout: a second driver on the
    run is refused (store/lease.py).
    """
    with driver_lease(run):
        return _complete_run(cfg, run, progress)


def _complete_run(cfg: Config, run: Run, progress: bool) -> RunResult:
    so = cfg.store.storage_options or None
    timings: dict[str, float] = dict(run.manifest.get("timings") or {})
    if run.manifest.get("status") == "done":
        out = read_sources(run)
        return RunResult(uri=run.uri, timings=timings, sources=out, segments=run.manifest.get("segments", 0),
                         num_steps=run.manifest.get("num_steps", 0))
    run_data.check_data(run)  # training files left in the store must be the ones recorded
    if not run_data.complete(run):  # a driver that died before the data was written
        timings["data"] = write_data(cfg, run)

    if not run.exists(FINAL_WEIGHTS):
        t = time.perf_counter()
        run.update_manifest(status="training")
        try:
            info = train(cfg, run, so, progress=progress)
        except NonFiniteLoss as err:  # what was committed stays readable; the run says why it stopped
            run.update_manifest(status="failed", error=str(err))
            raise
        timings["train"] = time.perf_counter() - t
        run.update_manifest(timings=timings, train_restarts=info["restarts"], resumed_from=info["resumed_from"])

    return attribute_recorded(cfg, run, timings, progress=progress)


def attribute_recorded(cfg: Config, run: Run, timings: dict[str, float] | None = None,
                       segments: int | None = None, progress: bool = True) -> RunResult:
    """The embedding and reduce stages on a recorded run (the built-in job's own training, or a
    user's loop recorded with rayattr.Recorder); a divergence marks the run failed. The run's
    driver lease is held throughout (store/lease.py)."""
    with driver_lease(run):
        return _attribute_recorded(cfg, run, timings, segments, progress)


def _attribute_recorded(cfg: Config, run: Run, timings: dict[str, float] | None,
                        segments: int | None, progress: bool) -> RunResult:
    timings = dict(timings if timings is not None else (run.manifest.get("timings") or {}))
    try:
        result = embed_and_reduce(cfg, run, run.reload_manifest()["num_steps"], segments=segments, progress=progress)
    except DivergenceError as err:  # nothing non-finite was written; the run says where it stopped
        message = str(getattr(err, "cause", None) or err)  # the message, not Ray's task traceback
        run.update_manifest(status="failed", error=message)
        raise DivergenceError(message) from None
    result.timings = {**timings, **result.timings}
    run.update_manifest(timings=result.timings)
    return result


def read_sources(run: Run) -> list[dict[str, Any]]:
    return run.read_table(SOURCE_VALUES).to_pylist()


# commit kinds the pipeline folds into index manifests (one compactor: this driver)
TRAINING_KINDS = (*WRITTEN_IN_TRAINING, RECORDS_KIND)
EMBEDDING_KINDS = (LOCAL_KIND, FINAL_KIND, CARRIED_KIND)


def response_beta2(cfg: Config, opt) -> float:
    """Adam's β₂ when the run records v's response rows (capture.v_response, docs/method.md §7),
    else 0: v frozen, no Q."""
    return opt.beta2 if cfg.capture.v_response and opt.adamw else 0.0


def attributable_from(run: Run, done: list[dict], opt) -> int:
    """The first step whose occurrences get values: 0, or one past the latest step a segment's
    sweep stopped at under embed.unstable "cut" (docs/method.md §9), recorded in the manifest
    with what made it unstable, and said once."""
    cuts = [d for d in done if d.get("unstable_step") is not None]
    if not cuts:
        run.update_manifest(attributable_from=0)
        return 0
    cut = max(cuts, key=lambda d: d["unstable_step"])
    first = int(cut["unstable_step"]) + 1
    run.update_manifest(attributable_from=first, unstable_step=cut["unstable_step"],
                        unstable_eta_lambda=cut["eta_lambda"], unstable_why=cut["why"])
    log.warning("the recursion is unstable at step %d (%s = %.3g, %s; %s): occurrences before step %d get no "
                "value (embed.unstable: cut)", cut["unstable_step"], eta_lambda_name(opt.adamw), cut["eta_lambda"],
                cut["why"], describe(cut["eta_lambda"], opt.beta1), first)
    return first


def embed_and_reduce(cfg: Config, run: Run, num_steps: int, segments: int | None = None,
              progress: bool = True) -> RunResult:
    """Embedding and reduce stages on a trained run: segment actors, the chain through them
    (vectors for the values, suffixes for the final embeddings), values and aggregates."""
    so = cfg.store.storage_options or None
    timings: dict[str, float] = {}
    t = time.perf_counter()
    # a resumed run keeps the cut it started with (its K's may already be written); another
    # cut is refused: segment artefacts are named by index
    n_seg, bounds = choose_segments(run, num_steps, segments,
                                    lambda: cfg.embed.segments or default_segments(cfg.train.use_gpu))
    ProjectionBlocks.register(run, cfg.embed.error_blocks, cfg.embed.joint_layers)  # refuses another layout
    record_choice(run, "momentum_curvature", cfg.embed.momentum_curvature, False)  # and another K
    record_choice(run, "unstable", cfg.embed.unstable, "refuse")  # and another reach
    run.update_manifest(status="embedding")
    edges = segment_bounds(num_steps, cfg.embed.phases)
    run.update_manifest(segments=n_seg, segment_bounds=bounds)
    # training's commit entries folded into a few manifests: each segment's readers then open
    # the ones covering its steps, not one entry per shard (rayattr/store/index.py)
    run.compact_index(TRAINING_KINDS)
    opt = resolve_optimizer(cfg)
    actors, specs, placement = start_segments(
        run.uri, so, num_steps, n_seg, edges, cfg.capture.curvature == "sampled",
        cfg.embed.keep_sample_embeddings, cfg.train.use_gpu, cfg.embed.dtype,
        cfg.embed.error_blocks, updates=opt.adamw, momentum=opt.beta1, beta2=response_beta2(cfg, opt),
        clip_response=cfg.embed.clip_response, momentum_curvature=cfg.embed.momentum_curvature,
        cut_unstable=cfg.embed.unstable == "cut")
    try:  # the actors and their placement group go on every exit path (a divergence included)
        # the test side first: each actor sums its shard of the validation set at the final
        # model before its sweep, so the model is freed before K is built
        shards = [a.validation_sum.remote(n_seg, "cuda" if cfg.train.use_gpu else "cpu") for a in actors]
        done = wait_all([a.compute.remote() for a in actors], "embed", progress)
        timings["embed"] = time.perf_counter() - t
        run.update_manifest(segment_nodes=[d["node"] for d in done],
                            segment_seconds=[d.get("seconds", 0.0) for d in done])
        worst = max(((d.get("max_eta_lambda", 0.0), d.get("max_eta_lambda_step", -1)) for d in done), default=(0.0, -1))
        if worst[0] > 0:  # η·λ_max(P H) under AdamW, with the bound that applies to it
            run.update_manifest(max_eta_lambda=worst[0], max_eta_lambda_step=worst[1],
                                eta_lambda_preconditioned=bool(opt.adamw), stability_edge=stability_edge(opt.beta1))
        if worst[0] > ETA_LAMBDA_WARN:
            log.warning("%s = %.3g at step %d (%s), %s; values may be dominated by it",
                        eta_lambda_name(opt.adamw), worst[0], worst[1], WHOSE_H, describe(worst[0], opt.beta1))
        first = attributable_from(run, done, opt)
        clipped = sum(1 for r in run.step_losses() if r.clip < 1.0)  # four columns of the records
        run.update_manifest(clipped_steps=clipped, clip_response=cfg.embed.clip_response)
        if clipped:
            log.warning("%s", clipping_note(clipped, num_steps, cfg.embed.clip_response))

        t = time.perf_counter()
        run.update_manifest(status="reducing")
        # the chains run through the actors (docs/method.md §4); each uses its own K only, and the
        # driver holds only object refs. Final embeddings need each segment's (S_ℓ, R_b): the
        # suffix scan M_{n-1} ⋯ M_{ℓ+1} across actors 1..n-1, in ⌈log2(n-1)⌉ rounds with a
        # device per actor, in blocks where actors share the devices (submitted first, so that no
        # actor's combines queue behind its link of the vector chain)
        keep = cfg.embed.keep_sample_embeddings
        links: list = [None] * n_seg
        if keep:
            own = [a.scan_link.remote() for a in actors[1:]]
            links[:-1] = suffix_scan(own, lambda i, later, mine: actors[i + 1].compose_links.remote(later, mine),
                                     width=default_segments(cfg.train.use_gpu))  # the cluster's devices
            del own
        # values from the vectors (w, z) = (S_ℓᵀ v, R_bᵀ v), from the last segment backwards
        vectors: list = [None] * n_seg
        vectors[-1] = actors[-1].shard_vectors.remote(*shards)
        for ell in range(n_seg - 1, 0, -1):
            vectors[ell - 1] = actors[ell].chain_vectors.remote(vectors[ell])
        finals = [a.finalize.remote(v, link, keep, first) for a, v, link in zip(actors, vectors, links)]
        if not keep:  # per-source mode: the sums by a forward scan of matrix-times-vectors only
            carry = None
            for ell, a in enumerate(actors):
                carry = a.chain_sums.remote(carry, ell == n_seg - 1, first)
            finals.append(carry)
        del vectors, links, shards  # each suffix is freed once its segment has finalised
        wait_all(finals, "finalize", progress)
        out = write_outputs(run, n_seg, edges)
        run.compact_index(EMBEDDING_KINDS)  # what queries read
        timings["reduce"] = time.perf_counter() - t
        run.update_manifest(status="done", phase_edges=edges,
                            finished=dt.datetime.now(dt.timezone.utc).isoformat())
    finally:
        stop_segments(actors, placement)
    return RunResult(uri=run.uri, timings=timings, sources=out["sources"], segments=n_seg, num_steps=num_steps)
