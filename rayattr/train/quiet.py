"""Known-harmless warnings of the rank processes, filtered by their exact text.

Only messages that were checked and carry no information for a rayattr user are dropped;
every other warning (and every other DeepSpeed log line) still reaches the job's output.
"""

from __future__ import annotations

import logging
import warnings

from rayattr.runtime.logs import DropMessages, drop_messages  # noqa: F401 (DropMessages re-exported)

# DeepSpeed's ZeRO calls the deprecated torch collective; nothing a user can change.
TORCH_WARNINGS = ((FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),)
# rayattr sets zero_allow_untested_optimizer itself: the rank hands DeepSpeed torch's own SGD or
# AdamW (train/engine.py), the optimizers the attribution models (optim/spec.py).
DEEPSPEED_LOGS = ("You are using ZeRO with an untested optimizer",
                  # WarmupLR/WarmupCosineLR's own constructor asks for the lr before step 0
                  "Attempting to get learning rate from scheduler before it has started")
# Expected on a CPU run only: on a GPU run it means the GPU was not found, which matters.
DEEPSPEED_CPU_LOGS = ("Setting accelerator to CPU",)


def _ray_train_report_logger() -> logging.Logger | None:
    """The logger of Ray Train's "Reporting training result N: TrainingReport(...)" line (INFO,
    once per ray.train.report on every rank). Ray names it by the module's *file*, so Ray
    Train's own log level (RunConfig.logging_config, "ray.train.*" names) does not reach it."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train: nothing known to quiet
        return None
    return logging.getLogger(context.__file__)


def quiet_known_noise(expect_gpu: bool) -> None:
    """Install the filters in this process (idempotent). Call before DeepSpeed is imported:
    its accelerator message is logged at import time, and a filter on the "DeepSpeed" logger
    set now stays when DeepSpeed configures that logger."""
    for category, pattern in TORCH_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    drop_messages(logging.getLogger("DeepSpeed"), DEEPSPEED_LOGS + (() if expect_gpu else DEEPSPEED_CPU_LOGS))
    report = _ray_train_report_logger()
    if report is not None:
        report.setLevel(logging.WARNING)
