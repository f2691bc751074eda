#!/usr/bin/env python
"""Pretrain with DeepSpeed under Ray while capturing gradients, then value every training sample.

    python jobs/pretrain_attr.py                                   # built-in demo, local Ray + local store
    python jobs/pretrain_attr.py --config jobs/configs/default.yaml --segments 4
    python jobs/pretrain_attr.py --resume run-20261124-101500          # finish a run whose driver died
    ray job submit --working-dir . -- python jobs/pretrain_attr.py --store s3://bucket/runs

The same job is `rayattr train [CONFIG]` where the package is installed (rayattr/pipeline/job.py).
With RAY_ADDRESS set (as `ray job submit` does) it joins that cluster; otherwise it starts a
Ray instance of its own on this machine, even when `ray start` left a cluster running.
"""

from __future__ import annotations

import os
import sys

# `python jobs/pretrain_attr.py` from a checkout works without installing the package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rayattr.pipeline.job import command_line_settings, main, parse_args, resolve_config  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
