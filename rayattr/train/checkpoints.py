"""DeepSpeed checkpoints through Ray Train, kept in the run so that a restarted worker group or a
new driver on the same run resumes from them.

Ray Train's storage is the run itself: `RunConfig(storage_path=<run>, name="checkpoints")`, on
the run's own filesystem (local files, or S3 through the run's fsspec filesystem with the
store's retries, rayattr/store/arrow_fs.py). At a
checkpoint step every rank saves its engine state into node-local scratch and hands it to
`ray.train.report`, which uploads each rank's files into one `checkpoints/checkpoint_*`
directory and registers the checkpoint only after every rank has reported: a checkpoint counts
only once it is complete (the same data-then-commit rule as shards), and the ranks go on only
once it counts. `ray.train.get_checkpoint()`
gives the latest registered one to a restarted worker group, and to a new driver on the same
run too, since Ray Train reloads its checkpoint manager from the same storage path and name.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from typing import Any

from rayattr.store import Run

NAME = "checkpoints"  # Ray Train's run name: its directory inside the run
TAG = "engine"  # DeepSpeed's tag inside each checkpoint directory
KEEP = 2  # checkpoints kept: the latest, and the one before while the latest uploads


def ray_train_storage(run: Run, name: str) -> dict[str, Any]:
    """RunConfig keywords that put a Ray Train run's checkpoints and bookkeeping in the run's
    directory `name` (e.g. "checkpoints"), on the run's own filesystem."""
    st = run._storage
    where, _, leaf = name.rpartition("/")
    root = posixpath.join(st.root, where) if where else st.root
    if st.local:
        return {"name": leaf, "storage_path": os.path.abspath(root)}
    from rayattr.store.arrow_fs import arrow_filesystem

    # through the store's retries: an outage the store's own writes ride out must not fail training
    return {"name": leaf, "storage_path": root, "storage_filesystem": arrow_filesystem(st.fs, st.options)}


def storage(run: Run) -> dict[str, Any]:
    """RunConfig keywords for the built-in job's checkpoints: `checkpoints/` of the run."""
    return ray_train_storage(run, NAME)


def save(engine, step: int, metrics: dict[str, Any]) -> None:
    """Collective: every rank calls it at the same step boundary, after committing what it
    recorded before `step` (a checkpoint never runs ahead of the recorded trajectory)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="rayattr-checkpoint-") as d:
        engine.save_checkpoint(d, tag=TAG, client_state={"step": step}, save_latest=False)
        ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(d))
    # Ray Train registers the checkpoint (and persists its snapshot) after the report returns:
    # wait for it, so that no rank trains (nor tells the driver it trained) past a checkpoint a
    # resume could not yet find
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def restore(engine, rank: int) -> int:
    """Load Ray Train's latest checkpoint into the engine; the step to go on from (0 if none)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        path, state = engine.load_checkpoint(d, tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"rank {rank}: DeepSpeed could not load {checkpoint.path}")
    return int(state["step"])
