#!/usr/bin/env python
"""Are per-source values a property of the data or of the training seed?

Holds the data files fixed (copied once from a default run) and runs the default job at
train seeds 0..N-1 (initial weights and batch order change, nothing else). Each run is then
validated by leaving every source out (`rayattr validate --sources`: same trajectory, the
source's occurrences at loss weight 0, so training keeps its number of steps). Prints, in one
run:
- the mean pairwise Spearman of per-source predicted values across seeds;
- how often `corrupted` ranks last (predicted, and in the retrains);
- each source's coefficient of variation across seeds;
- the Spearman between seed-averaged predictions and seed-averaged retrain effects;
- the same pairwise Spearman for the retrain effects (how stable the truth itself is).

    python bench/stability.py --seeds 5 [--set capture.rank=8] [--config jobs/configs/sgd.yaml]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import dotted, merge, run_job  # noqa: E402
from rayattr.validate import validate_run  # noqa: E402
from rayattr.validate.stats import spearman  # noqa: E402


def pairwise(rows: np.ndarray) -> float:
    return float(np.mean([spearman(a, b) for a, b in itertools.combinations(rows, 2)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--config", help="base config (YAML), e.g. jobs/configs/sgd.yaml; default: the built-in (AdamW)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=YAML", help="config override, dotted")
    p.add_argument("--store", help="keep the runs here (default: a temporary directory)")
    args = p.parse_args()
    if args.store:
        os.makedirs(args.store, exist_ok=True)
    store = args.store or tempfile.mkdtemp(prefix="rayattr-stability-")
    base = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    extra = merge(base or {}, dotted(args.set))
    # the data files of one default run, then every seed trains on exactly those
    first = run_job(store, "data-source", extra)
    data_dir = Path(store) / "data"
    data_dir.mkdir(exist_ok=True)
    for name in ("train", "validation"):
        (data_dir / f"{name}.parquet").write_bytes(first.read_bytes(f"data/{name}.parquet"))
    fixed = merge(extra, {"data": {"train": str(data_dir / "train.parquet"),
                                   "validation": str(data_dir / "validation.parquet")}})
    preds, truths = [], []
    sources = None
    for seed in range(args.seeds):
        run = run_job(store, f"seed{seed}", merge(fixed, {"train": {"seed": seed}}))
        table = run.read_table("values/sources.parquet")
        by = dict(zip(table["source"].to_pylist(), table["value"].to_pylist()))
        sources = sorted(by)
        src = validate_run(run, sources=True, progress=False).tables["source"]
        actual = dict(zip(src["source"].to_pylist(), src["actual"].to_pylist()))
        preds.append([by[s] for s in sources])
        truths.append([actual[s] for s in sources])
        print(f"seed {seed}: " + "  ".join(f"{s} {by[s]:+.3f}/{actual[s]:+.3f}" for s in sources)
              + "   (predicted/retrained)", flush=True)
    P, A = np.array(preds), np.array(truths)
    c = sources.index("corrupted")
    print(f"\n{args.seeds} seeds, data fixed{'; ' + args.config if args.config else ''}"
          f"{'; ' + ', '.join(args.set) if args.set else ''}")
    print(f"pairwise Spearman of predicted source values: {pairwise(P):.2f}   (retrained: {pairwise(A):.2f})")
    print(f"corrupted last: predicted {int(np.sum(P.argmin(1) == c))}/{args.seeds}, "
          f"retrained {int(np.sum(A.argmin(1) == c))}/{args.seeds}")
    cv = P.std(0, ddof=1) / np.abs(P.mean(0))
    print("coefficient of variation: " + "  ".join(f"{s} {v:.2f}" for s, v in zip(sources, cv)))
    print(f"Spearman(seed-mean predicted, seed-mean retrained): {spearman(P.mean(0), A.mean(0)):.2f}")
    print(f"runs kept in {store}")


if __name__ == "__main__":
    main()
