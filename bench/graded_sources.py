"""Sources that truly differ: does retraining order the graded corpus's sources the same way at
every training seed, and do the values order them as retraining does?

    python bench/graded_sources.py                      # seeds 0-4 of jobs/configs/graded.yaml
    python bench/graded_sources.py --seeds 0 1 --config my.yaml --out /tmp/graded

For each seed it trains the built-in job on the config with train.seed set (the seed also draws
the corpus, the initial weights and the batch order), then `rayattr validate RUN --sources`:
one retrain per source with that source's every occurrence removed, on the same batch plan.
One table:

- per seed: Spearman of the predicted source sums against the retrained Δloss (the product's
  answer), and the retrained order;
- across seeds: the smallest and mean pairwise Spearman of the retrained Δloss (is the truth
  stable?) and of the predictions (is the answer stable?).

Runs already in --out are reused, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]


def run_seed(config: Path, seed: int, out: Path) -> Path:
    run_dir = out / f"seed{seed}"
    if not (run_dir / "values").exists():
        cfg = yaml.safe_load(config.read_text())
        cfg.setdefault("train", {})["seed"] = seed
        seeded = out / f"seed{seed}.yaml"
        seeded.write_text(yaml.safe_dump(cfg))
        with open(out / f"seed{seed}.log", "w") as log:
            subprocess.run([sys.executable, str(ROOT / "jobs" / "pretrain_attr.py"), "--config", str(seeded),
                            "--store", str(out), "--run-id", run_dir.name, "--no-progress"],
                           check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if not (run_dir / "validation" / "sources.parquet").exists():
        with open(out / f"validate{seed}.log", "w") as log:
            subprocess.run([sys.executable, "-m", "rayattr.cli", "validate", str(run_dir), "--sources",
                            "--no-progress", "--format", "json"],
                           check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return run_dir


def source_table(run_dir: Path) -> dict[str, tuple[float, float]]:
    """source -> (predicted, retrained) loss change when it is left out."""
    t = pq.read_table(run_dir / "validation" / "sources.parquet").to_pylist()
    return {r["source"]: (r["predicted"], r["actual"]) for r in t}


def pairwise(columns: list[list[float]]) -> tuple[float, float]:
    rhos = [spearmanr(a, b).statistic for a, b in itertools.combinations(columns, 2)]
    return min(rhos), sum(rhos) / len(rhos)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "jobs" / "configs" / "graded.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", type=Path, default=Path("bench_graded"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    tables = {seed: source_table(run_seed(args.config, seed, args.out)) for seed in args.seeds}
    sources = sorted(tables[args.seeds[0]])
    print(f"config {args.config.name}, {len(sources)} sources, seeds {args.seeds}\n")
    print(f"{'seed':>4}  {'predicted vs retrained ρ':>24}  retrained order (most helpful first)")
    for seed, t in tables.items():
        rho = spearmanr([t[s][0] for s in sources], [t[s][1] for s in sources]).statistic
        order = sorted(sources, key=lambda s: -t[s][1])
        print(f"{seed:>4}  {rho:>24.3f}  {' > '.join(order)}")
    retrained = [[t[s][1] for s in sources] for t in tables.values()]
    predicted = [[t[s][0] for s in sources] for t in tables.values()]
    if len(tables) > 1:
        print(f"\nacross seeds, pairwise Spearman (min / mean): retrained {pairwise(retrained)[0]:.3f} / "
              f"{pairwise(retrained)[1]:.3f}, predicted {pairwise(predicted)[0]:.3f} / {pairwise(predicted)[1]:.3f}")
    print("\nper source, Δloss when left out (retrained | predicted), by seed:")
    for s in sources:
        cells = "  ".join(f"{t[s][1]:+.4f} | {t[s][0]:+.4f}" for t in tables.values())
        print(f"  {s:<16} {cells}")
    (args.out / "graded_sources.json").write_text(json.dumps({str(k): v for k, v in tables.items()}, indent=1))


if __name__ == "__main__":
    main()
