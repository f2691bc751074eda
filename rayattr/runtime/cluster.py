"""Joining Ray: the cluster named by RAY_ADDRESS (as `ray job submit` sets it), else a fresh
local instance of this process's own."""

from __future__ import annotations

import logging
import os

from rayattr.runtime.logs import drop_messages

log = logging.getLogger(__name__)

# Worker processes of a local instance: one thread each (actors share the machine's cores).
LOCAL_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# Ray's warnings that are no news: with RAY_AUTH_MODE unset a new local instance turns token
# authentication on (what rayattr wants) and says so at WARNING level on every start.
RAY_NOTICES = {"ray._private.authentication.authentication_token_setup":
               ("Token authentication is enabled for this Ray cluster",)}
# ... and in the worker processes: Ray Train's controller warns, with a traceback, whenever its
# resource request to the autoscaling coordinator times out on a busy CPU; Ray's own words
# are "it's safe to ignore this error" (a local instance has no autoscaler to ask)
RAY_WORKER_NOTICES = {"ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client":
                      ("Failed to send resource request for",)}
# runs in every worker process of the job as it starts (Ray's worker_process_setup_hook)
WORKER_SETUP = "rayattr.runtime.cluster.setup_ray_worker"


def setup_ray_worker() -> None:
    """Name this cluster in the worker's RAY_ADDRESS, and drop the RAY_WORKER_NOTICES.

    Ray's state API finds a cluster from RAY_ADDRESS, else from the file `ray start` leaves in
    Ray's temp dir. Ray Train's placement-group cleaner asks it whether the gang's controller
    lives: asked of another cluster (one `ray start` left on the machine), the answer is no,
    and the cleaner removes a live gang's placement group. The notices' filters stay when Ray
    Train configures its loggers later."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    for name, fragments in RAY_WORKER_NOTICES.items():
        drop_messages(logging.getLogger(name), fragments)


def connect(log_to_driver: bool = True) -> str:
    """Initialise Ray once; returns a line saying which cluster this process is on, and logs it
    at INFO (an entry point shows it: runtime/logs.show_warnings).

    Never a bare ray.init(): that attaches to whatever `ray start` left on the machine, and
    retries for ever a dead head still named in Ray's ray_current_cluster file.
    """
    import ray

    if ray.is_initialized():
        return "ray: already initialised in this process"
    line = _init(log_to_driver)
    log.info("%s", line)
    return line


def _init(log_to_driver: bool) -> str:
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if address:  # `ray job submit`: Ray merges this with the job's own runtime env (working_dir, env_vars)
        ctx = ray.init(address=address, log_to_driver=log_to_driver,
                       runtime_env={"worker_process_setup_hook": WORKER_SETUP})
        return f"ray: joined the cluster at {ctx.address_info['gcs_address']} (RAY_ADDRESS={address})"
    for name, fragments in RAY_NOTICES.items():
        drop_messages(logging.getLogger(name), fragments)
    # logging_level: Ray's INFO lines (the dashboard URL) repeat the line this returns
    ctx = ray.init(address="local", log_to_driver=log_to_driver,
                   runtime_env={"env_vars": LOCAL_ENV, "worker_process_setup_hook": WORKER_SETUP},
                   logging_level=logging.WARNING)
    return (f"ray: started a local Ray instance at {ctx.address_info['gcs_address']} "
            "(set RAY_ADDRESS to join a cluster)")
