"""Known-harmless warnings of the rank processes, filtered by their exact text.

Only messages that were checked and carry no information for a rayattr user are dropped;
every other warning (and every other DeepSpeed log line) still reaches the job's output.
"""

from __future__ import annotations

import logging
import warnings

# DeepSpeed's ZeRO calls the deprecated torch collective; nothing a user can change.
TORCH_WARNINGS = ((FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),)
# rayattr sets zero_allow_untested_optimizer itself: attribution assumes plain SGD.
DEEPSPEED_LOGS = ("You are using ZeRO with an untested optimizer",)
# Expected on a CPU run only: on a GPU run it means the GPU was not found, which matters.
DEEPSPEED_CPU_LOGS = ("Setting accelerator to CPU",)


class DropMessages(logging.Filter):
    """Drops log records whose message contains one of `fragments`."""

    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = tuple(fragments)

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(f in text for f in self.fragments)


def quiet_known_noise(expect_gpu: bool) -> None:
    """Install the filters in this process (idempotent). Call before DeepSpeed is imported:
    its accelerator message is logged at import time, and a filter on the "DeepSpeed" logger
    set now stays when DeepSpeed configures that logger."""
    for category, pattern in TORCH_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    logger = logging.getLogger("DeepSpeed")
    fragments = DEEPSPEED_LOGS + (() if expect_gpu else DEEPSPEED_CPU_LOGS)
    for f in [f for f in logger.filters if isinstance(f, DropMessages)]:
        logger.removeFilter(f)
    logger.addFilter(DropMessages(fragments))
