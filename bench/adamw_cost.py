#!/usr/bin/env python
"""What AdamW attribution costs against SGD, measured on the built-in job in one run.

Runs the job three times on the same data and sizes -- SGD (jobs/configs/sgd.yaml), AdamW
with the lagged preconditioner, AdamW with the step's own P (the built-in default) -- and
prints each stage's wall time, a rank's peak RSS and the store's bytes per row kind, as ratios
against SGD:
- train: capture with update rows (the step's own P: the factors kept until the step's end,
  v's row and column sums read after it);
- rank RSS: the largest resident set of a Ray Train worker (a rank) while it runs;
- store: the update rows next to the gradient rows;
- embed: the recursion carrying R next to K and reading two row kinds.

    python bench/adamw_cost.py [--repeats 2] [--set train.epochs=1] [--large]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from harness import dotted, merge  # noqa: E402
from scale import run_polled  # noqa: E402

SETTINGS = {
    "SGD": ("sgd.yaml", {}),
    "AdamW, lagged P": (None, {"capture": {"preconditioner": "lagged"}}),
    "AdamW, step's own P": (None, {"capture": {"preconditioner": "lookahead"}}),
}
LARGE = {"model": {"n_layer": 4, "n_embd": 256, "n_head": 4},
         "data": {"seq_len": 128, "builtin": {"max_chars": 256}},
         "train": {"micro_batch": 4}}  # 2 ranks x 4 = a global batch of 8 x 128 tokens
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
    p.add_argument("--large", action="store_true", help="GPT-2 4 layers x 256, global batch 8 x 128 tokens")
    p.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS), metavar="NAME",
                   help=f"which settings to run (default all: {', '.join(SETTINGS)}); SGD always runs")
    args = p.parse_args()
    store = Path(tempfile.mkdtemp(prefix="rayattr-adamw-cost-"))
    extra = merge(LARGE, dotted(args.set)) if args.large else dotted(args.set)
    chosen = {k: v for k, v in SETTINGS.items() if k == "SGD" or k in args.settings}
    times: dict[str, dict[str, float]] = {name: {} for name in chosen}
    rss: dict[str, int] = {}
    volume: dict[str, dict[str, int]] = {}
    loads = []
    for rep in range(args.repeats):
        for i, (name, (file, over)) in enumerate(chosen.items()):
            base = yaml.safe_load((ROOT / "jobs" / "configs" / file).read_text()) if file else {}
            loads.append(os.getloadavg()[0])
            _, poll = run_polled(str(store), f"s{i}r{rep}", merge(merge(base, over), extra))
            timings = json.loads((store / f"s{i}r{rep}" / "run.json").read_text())["timings"]
            for stage in STAGES:
                times[name][stage] = min(times[name].get(stage, float("inf")), timings[stage])
            rss[name] = max(rss.get(name, 0), poll.by_group().get("rank actor", 0))
            volume[name] = store_bytes(store / f"s{i}r{rep}")
    print(f"{'GPT-2 4 x 256, batch 8 x 128' if args.large else 'built-in job'}, {os.cpu_count()} CPUs, "
          f"best of {args.repeats}{'; ' + ', '.join(args.set) if args.set else ''}; load average at each "
          f"start: {' '.join(f'{x:.1f}' for x in loads)}")
    print(f"{'setting':22s} " + " ".join(f"{s + ' s':>9s} {'×SGD':>6s}" for s in STAGES)
          + f" {'rank RSS MB':>12s} {'×SGD':>6s}")
    sgd = times["SGD"]
    for name, t in times.items():
        print(f"{name:22s} " + " ".join(f"{t[s]:9.2f} {t[s] / sgd[s]:6.2f}" for s in STAGES)
              + f" {rss[name] / 1e6:12.0f} {rss[name] / rss['SGD']:6.2f}")
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
