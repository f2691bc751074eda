"""What the benchmarks share: running the job on a config, and config overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rayattr.store import Run  # noqa: E402


def run_job(store: str, run_id: str, settings: dict) -> Run:
    """`jobs/pretrain_attr.py` on `settings` (a config dict) in its own process and local Ray;
    exits with the job's error output if it fails."""
    cfg = Path(store) / f"{run_id}.yaml"
    cfg.write_text(yaml.safe_dump(settings))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "jobs/pretrain_attr.py", "--config", str(cfg), "--store", store,
                          "--run-id", run_id, "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return Run.open(store, run_id, mode="record")


def dotted(items: list[str]) -> dict:
    """["train.lr=0.03", ...] as a nested config dict (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def merge(a: dict, b: dict) -> dict:
    """a with b's keys laid over it, section by section."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out
