"""Process-group and DeepSpeed-config plumbing for rank actors (kept apart from the training loop)."""

from __future__ import annotations

import copy
import os
import socket
from typing import Any

from rayattr.config import Config, ConfigError
from rayattr.optim.spec import resolve_optimizer


def free_port() -> int:
    """A free port on loopback, for the env:// rendezvous of ranks a script launches itself
    (jobs/examples/hf_trainer.py without a launcher, bench/adamw_traffic.py)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# DeepSpeed's shared-memory all-reduce for CPU inference (deepspeed/comm/torch.py, build_shm_op)
SHM_COMM_OP = "deepspeed_shm_comm"


def without_shm_comm_op() -> None:
    """Keep DeepSpeed from loading its CPU shared-memory all-reduce op in this rank. Every CPU
    rank's init_distributed JIT-loads it under a lock file in the torch extensions cache, and
    a rank killed while it holds the lock (a fault, a restart, a timeout) leaves the file: every
    later rank on the machine then waits for it for ever. Training's all-reduce is
    torch.distributed's (gloo) either way; the op serves DeepSpeed's inference all-reduce only."""
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible[SHM_COMM_OP] = False


def join_process_group(cfg: Config):
    """This rank into the gang's process group (gloo on CPU, NCCL with use_gpu), with one
    thread per OMP_NUM_THREADS; returns the torch device the rank trains on. The group is
    already up (Ray Train's TorchTrainer made it, or a launcher's env:// rendezvous) and
    DeepSpeed joins it."""
    import deepspeed
    import torch

    torch.set_num_threads(max(1, int(float(os.environ.get("OMP_NUM_THREADS", "1")))))
    use_gpu = cfg.train.use_gpu and torch.cuda.is_available()
    if not use_gpu:
        without_shm_comm_op()
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    return torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")


# Scheduler params that may say "auto" and what they become for a run of n optimizer steps
# (the way HF's DeepSpeed integration fills "auto" from its own settings)
AUTO_SCHEDULER_PARAMS = {
    "total_num_steps": lambda n: n,
    "warmup_num_steps": lambda n: max(1, round(0.1 * n)),  # a tenth of the run
}


def deepspeed_config(cfg: Config, num_steps: int | None = None) -> dict[str, Any]:
    """The user's DeepSpeed config with batch sizes filled from the run's config, and the
    scheduler's "auto" step counts from the run's number of optimizer steps.

    Batch keys the user set must agree with ours: the per-sample step size depends on them.
    """
    ds = copy.deepcopy(cfg.train.deepspeed)
    params = (ds.get("scheduler") or {}).get("params") or {}
    for key, value in params.items():
        if value != "auto":
            continue
        if key not in AUTO_SCHEDULER_PARAMS:
            raise ConfigError(f"train.deepspeed.scheduler.params.{key}: 'auto' is only understood for "
                              f"{', '.join(AUTO_SCHEDULER_PARAMS)}")
        if num_steps is None:
            raise ConfigError(f"train.deepspeed.scheduler.params.{key}: 'auto' needs the run's number of steps")
        params[key] = AUTO_SCHEDULER_PARAMS[key](int(num_steps))
    t = cfg.train
    want = {"train_micro_batch_size_per_gpu": t.micro_batch, "gradient_accumulation_steps": t.grad_accum,
            "train_batch_size": cfg.global_batch}
    for key, value in want.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"train.deepspeed.{key}={ds[key]} disagrees with the run's batch settings ({value})")
        ds[key] = value
    if resolve_optimizer(cfg).adamw:
        # the rank builds torch.optim.AdamW itself (engine.py), whichever block asked for it
        ds.pop("optimizer", None)
    ds.setdefault("zero_allow_untested_optimizer", True)  # plain torch.optim.SGD / AdamW under ZeRO
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds
