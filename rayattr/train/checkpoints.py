"""DeepSpeed checkpoints kept in the run, so a restarted rank (or a new driver) can resume.

A local run lets DeepSpeed write straight into `<run>/checkpoints/`. For an object store each
rank saves into node-local scratch and uploads its own files to `checkpoints/<tag>/`; a
resuming rank downloads the tag and loads it. Either way `checkpoints/latest.json` is written
by rank 0 after every rank's files are in place (the same data-then-commit rule as shards), so
a checkpoint counts only once it is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch.distributed as dist

from rayattr.store import Run

LATEST = "checkpoints/latest.json"


def is_local(run: Run) -> bool:
    return "://" not in run.uri or run.uri.startswith("file://")


def tag_of(step: int) -> str:
    return f"step{step:08d}"


class Checkpoints:
    """Save and restore one rank's DeepSpeed engine state inside a run."""

    def __init__(self, run: Run, rank: int):
        self.run, self.rank = run, rank
        if is_local(run):
            self.root = os.path.join(run.uri.removeprefix("file://"), "checkpoints")
        else:
            self.root = os.path.join(tempfile.gettempdir(), "rayattr-checkpoints", run.run_id, f"rank{rank}")

    def latest(self) -> dict | None:
        """{"step", "tag"} of the last complete checkpoint, or None."""
        return self.run.read_json(LATEST) if self.run.exists(LATEST) else None

    def save(self, engine, step: int) -> None:
        """Collective: every rank calls it at the same step boundary."""
        tag = tag_of(step)
        os.makedirs(self.root, exist_ok=True)
        engine.save_checkpoint(self.root, tag=tag, client_state={"step": step}, save_latest=False)
        if not is_local(self.run):
            folder = os.path.join(self.root, tag)
            for name in sorted(os.listdir(folder)):
                with open(os.path.join(folder, name), "rb") as f:
                    self.run.write_bytes(f"checkpoints/{tag}/{name}", f.read())
            shutil.rmtree(folder, ignore_errors=True)
        dist.barrier()  # every rank's files are in place before the marker
        if self.rank == 0:
            self.run.write_json(LATEST, {"step": step, "tag": tag})

    def restore(self, engine) -> int:
        """Load the latest complete checkpoint into the engine; the step to go on from (0 if none)."""
        latest = self.latest()
        if latest is None:
            return 0
        tag = latest["tag"]
        if not is_local(self.run):
            folder = os.path.join(self.root, tag)
            os.makedirs(folder, exist_ok=True)
            for name in self.run.list(f"checkpoints/{tag}"):
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(self.run.read_bytes(f"checkpoints/{tag}/{name}"))
        path, state = engine.load_checkpoint(self.root, tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"rank {self.rank}: DeepSpeed could not load checkpoint {tag} from {self.root}")
        return int(state["step"])
