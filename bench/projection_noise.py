#!/usr/bin/env python
"""How much of a run's values is projection noise, and does value_se say so?

Runs the default job at one projection rank with several projection seeds (capture.seed):
training is identical across them (capture does not touch it), so the spread of each
occurrence's value over the seeds is the projection's error alone. Prints, in one run:
- the ratio of the reported value_se to that measured spread (1 = calibrated);
- for the top-10 helpful and harmful occurrences of seed 0: how many stand 2 SE from zero;
- each source's value over the seeds.

    python bench/projection_noise.py --rank 8 --seeds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import run_job  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--store", help="keep the runs here (default: a temporary directory)")
    args = p.parse_args()
    if args.store:
        os.makedirs(args.store, exist_ok=True)
    store = args.store or tempfile.mkdtemp(prefix="rayattr-noise-")
    runs = [run_job(store, f"rank{args.rank}-seed{s}", {"capture": {"rank": args.rank, "seed": s}})
            for s in range(args.seeds)]
    tables = [r.read_table("values/samples.parquet") for r in runs]
    V = np.stack([t["value"].to_numpy() for t in tables])
    SE = np.stack([t["value_se"].to_numpy() for t in tables])
    measured = V.std(0, ddof=1)
    reported = np.sqrt((SE ** 2).mean(0))
    print(f"rank {args.rank}, {args.seeds} projection seeds, {V.shape[1]} occurrences")
    print(f"value_se / measured spread: median {np.median(reported / measured):.2f}, "
          f"rms {np.sqrt(np.mean(reported ** 2)) / np.sqrt(np.mean(measured ** 2)):.2f}")
    v0, se0 = V[0], SE[0]
    order = np.argsort(v0)
    for name, rows in (("helpful", order[-10:]), ("harmful", order[:10])):
        above = int(np.sum(np.abs(v0[rows]) > 2 * se0[rows]))
        print(f"top-10 {name}: {above}/10 stand 2 SE from zero; |value|/SE median {np.median(np.abs(v0[rows]) / se0[rows]):.1f}")
    print(f"all occurrences: {np.mean(np.abs(v0) > 2 * se0):.0%} stand 2 SE from zero")
    src = tables[0]["source"].to_numpy(zero_copy_only=False)
    print("source value over the seeds (training identical):")
    for s in sorted(set(src)):
        print(f"  {s:<12}" + "  ".join(f"{x:+.4f}" for x in V[:, src == s].sum(1)))


if __name__ == "__main__":
    main()
