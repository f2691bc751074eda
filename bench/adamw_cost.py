#!/usr/bin/env python
"""What AdamW attribution costs against SGD, measured on the built-in job in one run.

Runs the job three times on the same data and sizes -- SGD (jobs/configs/sgd.yaml), AdamW
with the lagged preconditioner, AdamW with the lookahead one (the built-in default) -- and
prints each stage's wall time and the store's bytes per row kind, as ratios against SGD:
- train: capture with update rows (and, for the lookahead, its extra forward/backward);
- store: the update rows next to the gradient rows;
- embed: the recursion carrying R next to K and reading two row kinds.

    python bench/adamw_cost.py [--repeats 2] [--set train.epochs=1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from harness import dotted, merge, run_job  # noqa: E402

SETTINGS = {
    "SGD": ("sgd.yaml", {}),
    "AdamW, lagged P": (None, {"capture": {"preconditioner": "lagged"}}),
    "AdamW, lookahead P": (None, {"capture": {"preconditioner": "lookahead"}}),
}
STAGES = ("train", "embed", "reduce")


def store_bytes(root: Path) -> dict[str, int]:
    """Bytes under each grads/<kind>/ of a local run."""
    out = {}
    for kind in sorted(p.name for p in (root / "grads").iterdir()):
        out[kind] = sum(f.stat().st_size for f in (root / "grads" / kind).rglob("*") if f.is_file())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2, help="runs per setting, interleaved; the best time counts")
    p.add_argument("--set", action="append", default=[], metavar="KEY=YAML", help="config override, dotted")
    args = p.parse_args()
    store = Path(tempfile.mkdtemp(prefix="rayattr-adamw-cost-"))
    extra = dotted(args.set)
    times: dict[str, dict[str, float]] = {name: {} for name in SETTINGS}
    volume: dict[str, dict[str, int]] = {}
    for rep in range(args.repeats):
        for i, (name, (file, over)) in enumerate(SETTINGS.items()):
            base = yaml.safe_load((ROOT / "jobs" / "configs" / file).read_text()) if file else {}
            run = run_job(str(store), f"s{i}r{rep}", merge(merge(base, over), extra))
            timings = run.manifest["timings"]
            for stage in STAGES:
                times[name][stage] = min(times[name].get(stage, float("inf")), timings[stage])
            volume[name] = store_bytes(store / f"s{i}r{rep}")
    print(f"built-in job, {os.cpu_count()} CPUs, best of {args.repeats}"
          f"{'; ' + ', '.join(args.set) if args.set else ''}")
    print(f"{'setting':22s} " + " ".join(f"{s + ' s':>9s} {'×SGD':>6s}" for s in STAGES))
    sgd = times["SGD"]
    for name, t in times.items():
        print(f"{name:22s} " + " ".join(f"{t[s]:9.2f} {t[s] / sgd[s]:6.2f}" for s in STAGES))
    print("\nstore, MB per row kind (train = g rows, update = u rows, local/embeddings = the embed stage's output)")
    kinds = sorted({k for v in volume.values() for k in v})
    print(f"{'setting':22s} " + " ".join(f"{k:>11s}" for k in kinds) + f" {'total':>9s} {'×SGD':>6s}")
    total_sgd = sum(volume["SGD"].values())
    for name, v in volume.items():
        total = sum(v.values())
        print(f"{name:22s} " + " ".join(f"{v.get(k, 0) / 1e6:11.1f}" for k in kinds)
              + f" {total / 1e6:9.1f} {total / total_sgd:6.2f}")
    print(f"runs kept in {store}")


if __name__ == "__main__":
    main()
