"""Joining Ray: the cluster named by RAY_ADDRESS (as `ray job submit` sets it), else a fresh
local instance of this process's own."""

from __future__ import annotations

import os

# Worker processes of a local instance: one thread each (actors share the machine's cores).
LOCAL_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def connect(log_to_driver: bool = True) -> str:
    """Initialise Ray once; returns a line saying which cluster this process is on.

    Never a bare ray.init(): that attaches to whatever `ray start` left on the machine, and
    retries for ever a dead head still named in Ray's ray_current_cluster file.
    """
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return "ray: already initialised in this process"
    if address:  # `ray job submit`: the job's own runtime env applies (working_dir, env_vars)
        ctx = ray.init(address=address, log_to_driver=log_to_driver)
        return f"ray: joined the cluster at {ctx.address_info['gcs_address']} (RAY_ADDRESS={address})"
    ctx = ray.init(address="local", log_to_driver=log_to_driver, runtime_env={"env_vars": LOCAL_ENV})
    return (f"ray: started a local Ray instance at {ctx.address_info['gcs_address']} "
            "(set RAY_ADDRESS to join a cluster)")
