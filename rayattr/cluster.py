"""Joining Ray: the cluster named by RAY_ADDRESS (as `ray job submit` sets it), else a fresh
local instance of this process's own."""

from __future__ import annotations

import os

# Worker processes of a local instance: one thread each (actors share the machine's cores).
LOCAL_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def connect(log_to_driver: bool = True) -> str:
    """Initialise Ray once; returns the address it joined ("local" for a new instance).

    Without RAY_ADDRESS this starts a new local instance (address="local") rather than
    attaching to whatever cluster `ray start` may have left on the machine.
    """
    import ray

    address = os.environ.get("RAY_ADDRESS") or "local"
    if not ray.is_initialized():
        if address != "local":  # the job's own runtime env applies (working_dir, env_vars)
            ray.init(address=address, log_to_driver=log_to_driver)
        else:
            ray.init(address="local", log_to_driver=log_to_driver, runtime_env={"env_vars": LOCAL_ENV})
    return address
