#!/usr/bin/env python
"""Fidelity of the default job: do its values predict retraining? (`rayattr validate`)

For each setting (curvature empirical / sampled; config overrides via --set) it runs the
default job, validates it by counterfactual retraining and prints, in one run:
LDS over random subsets (with its bootstrap interval), the leave-one-source-out Spearman,
the single-occurrence Spearman, their magnitudes (least-squares slope actual ≈ c·predicted),
and how far one occurrence moves the final loss against what was predicted.

With --exact it also replays each run in float64 and computes exact first-order values
(bench/exact_reference.py: exact Hessian-vector products, exact clipping) to tell the
approximations (projection, Fisher curvature) from the limits of any first-order method.

    python bench/fidelity.py                       # SGD with empirical and sampled curvature, 16 subsets
    python bench/fidelity.py --subsets 32 --exact
    python bench/fidelity.py --settings adamw
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import dotted, merge, run_job  # noqa: E402
from rayattr.store import Run  # noqa: E402
from rayattr.validate import validate_run  # noqa: E402
from rayattr.validate.counterfactuals import Removal  # noqa: E402
from rayattr.validate.stats import slope, spearman  # noqa: E402

SGD = yaml.safe_load((ROOT / "jobs/configs/sgd.yaml").read_text())
SETTINGS = {
    # the built-in run under plain SGD (jobs/configs/sgd.yaml), with either curvature
    "empirical": {**SGD, "capture": {"curvature": "empirical"}},
    "sampled": {**SGD, "capture": {"curvature": "sampled"}},
    # the built-in default: AdamW, warm-up then cosine decay, weight decay 0.1, lookahead P
    "adamw": {},
    "adamw-lagged": {"capture": {"preconditioner": "lagged"}},
}


def exact_rows(run: Run) -> list[str]:
    """Spearman/slope of exact first-order values against the same retrains."""
    from exact_reference import Replay

    replay = Replay(run)
    thetas = replay.train()
    recs = [run.read_json(f"validation/retrains/{n}") for n in run.list("validation/retrains")]
    base = next(r["loss"] for r in recs if r["removal"]["kind"] == "baseline")
    lines = []
    for label, kw in (("exact H, exact clip", {}), ("no curvature (K = I)", {"curvature": False})):
        vals = replay.values(thetas, **kw)
        parts = []
        for kind in ("subset", "source", "occurrence"):
            rs = [r for r in recs if r["removal"]["kind"] == kind]
            if len(rs) < 3:
                continue
            pred = []
            for r in rs:
                rem = Removal.from_dict(r["removal"])
                ids = set(rem.sample_ids)
                pred.append(sum(v for (s, i), v in vals.items() if i in ids and rem.step in (None, s)))
            actual = [r["loss"] - base for r in rs]
            parts.append(f"{kind} ρ {_f(spearman(pred, actual))} c {_f(slope(pred, actual))}")
        lines.append(f"    {label:<24}" + "   ".join(parts))
    return lines


def _f(x) -> str:
    return "   –  " if x is None else f"{x:+.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subsets", type=int, default=16)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--occurrences", type=int, default=16)
    p.add_argument("--settings", nargs="*", default=["empirical", "sampled"], choices=list(SETTINGS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                   help="extra config for every setting, e.g. train.lr=0.03 (dotted key)")
    p.add_argument("--exact", action="store_true", help="also exact first-order values (float64 replay)")
    p.add_argument("--store", help="keep the runs here (default: a temporary directory)")
    args = p.parse_args()
    if args.store:
        os.makedirs(args.store, exist_ok=True)
    store = args.store or tempfile.mkdtemp(prefix="rayattr-fidelity-")
    extra = dotted(args.set)
    print(f"default job{' with ' + ', '.join(args.set) if args.set else ''}; {args.subsets} subsets of "
          f"{args.fraction:.0%}, every source, {args.occurrences} single occurrences")
    for name in args.settings:
        settings = merge(SETTINGS[name], extra)
        run = run_job(store, name, settings)
        s = validate_run(run, subsets=args.subsets, fraction=args.fraction, sources=True,
                         occurrences=args.occurrences, seed=0, progress=False).summary
        ci = s["lds_ci"] or [float("nan")] * 2
        print(f"{name:<10} LDS {_f(s['lds'])} [{ci[0]:+.2f}, {ci[1]:+.2f}] c {_f(s['subset_slope'])}   "
              f"sources ρ {_f(s['source_spearman'])} c {_f(s['source_slope'])}   "
              f"occurrences ρ {_f(s['occurrence_spearman'])} c {_f(s['occurrence_slope'])}   "
              f"one occurrence moves the loss {s['occurrence_actual_rms']:.2g} rms (predicted "
              f"{s['occurrence_predicted_rms']:.2g}); nothing-removed retrain Δweight {s['baseline_max_abs_diff']:.1g}")
        if args.exact and name != "adamw":  # the float64 replay follows SGD only
            print("\n".join(exact_rows(run)))
    print(f"runs kept in {store}")


if __name__ == "__main__":
    main()
