"""`rayattr attribute RUN`: the embedding and reduce stages on a recorded run, as a job of its own.

Recording happens inside the training job (rayattr.Recorder, the HF callback, or the built-in
job); attribution reads only the run, so it can run later and elsewhere (CPU nodes for a GPU
run). A recorded, not yet attributed run has manifest status "recorded"
(rayattr/record/recorder.py); one interrupted while embedding picks up where it stopped.
"""

from __future__ import annotations

from rayattr.config import Config, ConfigError
from rayattr.embed.cut import choose_segments
from rayattr.store import Run, StoreOptions, open_run_ref
from rayattr.store.registrations import TRAINING_KINDS, wait_closed
from rayattr.store.layout import FINAL_WEIGHTS, VALIDATION_DATA

# statuses attribution starts or resumes from ("failed" only once training had finished)
ATTRIBUTABLE = ("recorded", "embedding", "reducing", "failed")


def open_recorded(ref: str | Run, storage_options: dict | None = None, wait_s: float = 0.0) -> Run:
    """The run (writable), checked to hold a finished recording: final weights, step records,
    its config and layer sizes, and every writer of its recording closed (waiting up to
    `wait_s` seconds for the open ones); a clear error naming what is missing otherwise."""
    run = ref if isinstance(ref, Run) else open_run_ref(
        str(ref), options=StoreOptions(storage_options=dict(storage_options or {})), mode="record")
    m = run.manifest
    status = m.get("status", "unknown")
    if status == "done":
        return run
    missing = [what for what, ok in [
        ("config (the manifest's 'config')", "config" in m),
        ("layer sizes (manifest 'layer_dims')", "layer_dims" in m),
        ("step count (manifest 'num_steps')", "num_steps" in m),
        (f"final weights ({FINAL_WEIGHTS})", run.exists(FINAL_WEIGHTS)),
        (f"validation data ({VALIDATION_DATA})", run.exists(VALIDATION_DATA)),
    ] if not ok]
    if status not in ATTRIBUTABLE or missing:
        raise ConfigError(f"run {run.uri} (status '{status}') is not a finished recording: missing "
                          f"{', '.join(missing) or 'nothing, but its status is not one of ' + str(ATTRIBUTABLE)}; "
                          "finish the training with Recorder.finish() (or `rayattr train --resume`)")
    wait_closed(run, TRAINING_KINDS, timeout_s=wait_s,
                what="writers of its recording are still open, so some of its steps are not committed "
                     "(finish the training, or give `rayattr attribute --wait SECONDS`)")
    return run


def attribute(run: str | Run, *, segments: int | None = None, cpu: bool = False,
              storage_options: dict | None = None, progress: bool = True, wait_s: float = 0.0):
    """Values for a recorded run: embed + reduce on Ray (RAY_ADDRESS's cluster, else a local
    instance). `cpu=True` runs the segment actors on CPUs whatever the training used. A run
    whose writers are still open is refused (after waiting up to `wait_s` seconds for them).
    Returns the pipeline's RunResult; an already attributed run is returned as it is."""
    import ray

    from rayattr.runtime.cluster import connect
    from rayattr.pipeline.stages import RunResult, attribute_recorded, read_sources

    if segments is not None and (not isinstance(segments, int) or segments < 1):
        raise ConfigError(f"segments must be a whole number >= 1, got {segments!r}")
    run = open_recorded(run, storage_options, wait_s=wait_s)
    m = run.manifest
    if m.get("status") != "done" and segments is not None:  # refused before Ray starts
        choose_segments(run, int(m["num_steps"]), segments)
    if m.get("status") == "done":
        return RunResult(uri=run.uri, timings=dict(m.get("timings") or {}), sources=read_sources(run),
                         segments=m.get("segments", 0), num_steps=m.get("num_steps", 0))
    cfg = Config.from_dict(m["config"]).with_overrides(
        **{"store.uri": run.uri.rsplit("/", 1)[0], "run_id": run.run_id})
    cfg.store.storage_options = dict(storage_options or {})
    if cpu:
        cfg.train.use_gpu = False
    if not ray.is_initialized():
        connect()
    return attribute_recorded(cfg, run, segments=segments, progress=progress)
