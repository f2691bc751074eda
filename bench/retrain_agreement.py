"""How well each estimate of a run's occurrences predicts the run's own counterfactual retrains.

    PYTHONPATH=. python bench/retrain_agreement.py RUN --cache S.npz [S2.npz ...] [--values RUN2 ...]

`rayattr validate RUN --subsets N --sources --window A:B` retrains removals and judges the
run's values against them; `bench/exact_adamw.py --cache S.npz` keeps the exact response and
every sweep of the same run as (steps × batch) columns. This judges every such column, and the
values of other runs on the same trajectory (`--values`: re-embeddings, other capture settings
with the same seed), on the same retrains: per group of removals (kind, window, size), the
Spearman correlation of predicted with retrained loss changes (the LDS for subsets, with a
bootstrap 95 % interval) and the least-squares size (retrained ÷ predicted). A removal's
prediction is the sum of the column over its occurrences, as validate sums the values
(docs/method.md §6).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rayattr.store import Run  # noqa: E402
from rayattr.validate.counterfactuals import Removal, predicted_all  # noqa: E402
from rayattr.validate.stats import bootstrap_spearman_ci, slope, spearman  # noqa: E402
from rayattr.validate.validation import finished_retrains  # noqa: E402


def retrains(run: Run) -> tuple[float, list[tuple[Removal, float]]]:
    """The nothing-removed retrain's loss, and every subset and source removal with its loss."""
    base, out = None, []
    for rec in finished_retrains(run).values():
        removal = Removal.from_dict(rec["removal"])
        if removal.kind == "baseline":
            base = rec["loss"]
        elif removal.kind in ("subset", "source"):
            out.append((removal, rec["loss"]))
    if base is None:
        raise SystemExit(f"{run.uri} has no validation retrains: run `rayattr validate` on it first")
    return base, out


def group(removal: Removal) -> tuple[str, tuple[int, int] | None, int]:
    """Removals judged together: same kind and window, and for subsets the same size."""
    return removal.kind, removal.window, len(removal.sample_ids) if removal.kind == "subset" else 0


def predictions(ids: np.ndarray, steps: np.ndarray, column: np.ndarray, removals: list[Removal]) -> np.ndarray:
    """Σ of `column` over each removal's occurrences; `ids`, `steps`, `column` are aligned arrays
    of the run's occurrences (a NaN, an occurrence the estimate does not value, counts 0),
    summed by validate's own :func:`predicted_all` as if the column were the run's values."""
    x = np.asarray(column, np.float64).ravel()
    valued = np.isfinite(x)
    table = pa.table({"step": np.asarray(steps, np.int64).ravel()[valued],
                      "sample_id": np.asarray(ids, np.int64).ravel()[valued], "value": x[valued]})
    return np.array([v for v, _ in predicted_all(table, removals)])


def agreement(ids: np.ndarray, steps: np.ndarray, columns: dict[str, np.ndarray], base: float,
              done: list[tuple[Removal, float]], seed: int = 0) -> list[dict]:
    """One row per (group of removals, column): Spearman, its interval (subsets), size."""
    rows = []
    for key in sorted({group(r) for r, _ in done}, key=str):
        chosen = [(r, loss) for r, loss in done if group(r) == key]
        actual = np.array([loss - base for _, loss in chosen])
        for name, column in columns.items():
            pred = predictions(ids, steps, column, [r for r, _ in chosen])
            ci = bootstrap_spearman_ci(pred, actual, np.random.default_rng(seed)) if key[0] == "subset" else None
            rows.append({"kind": key[0], "window": key[1], "size": key[2], "n": len(chosen), "estimate": name,
                         "spearman": spearman(pred, actual), "ci": ci, "slope": slope(pred, actual)})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="the validated run (its retrains, its values)")
    ap.add_argument("--cache", type=Path, nargs="*", default=[], help="bench/exact_adamw.py caches of this run")
    ap.add_argument("--values", nargs="*", default=[], help="other runs on the same trajectory, judged by their values")
    ap.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals")
    args = ap.parse_args(argv)
    from exact_adamw import AdamWReplay, values_column

    run = Run.open_uri(args.run)
    rp = AdamWReplay(run)
    ids, steps = rp.occurrences()
    columns: dict[str, np.ndarray] = {}
    for cache in args.cache:
        columns.update(dict(np.load(cache)))
    for uri in [args.run, *args.values]:
        columns[f"values of {Path(uri).name}"] = values_column(Run.open_uri(uri), rp)
    base, done = retrains(run)
    last = None
    for row in agreement(ids, steps, columns, base, done, args.seed):
        head = (row["kind"], row["window"], row["size"])
        if head != last:
            what = f"subsets of {row['size']} samples" if row["kind"] == "subset" else "sources left out"
            print(f"\n{row['n']} {what}, steps {list(row['window']) if row['window'] else 'all'}")
            print("| estimate | Spearman [95 % CI] | size (retrained ÷ predicted) |\n|---|---:|---:|")
            last = head
        rho = "–" if row["spearman"] is None else f"{row['spearman']:+.2f}"
        ci = f" [{row['ci'][0]:+.2f}, {row['ci'][1]:+.2f}]" if row["ci"] else ""
        size = "–" if row["slope"] is None else f"{row['slope']:.2f}"
        print(f"| {row['estimate']} | {rho}{ci} | {size} |")


if __name__ == "__main__":
    main()
