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
    python bench/fidelity.py --targets --store DIR   # issue 23's targets, one table (about an hour)

--targets measures, in one run and one table, whether the values are right where rightness is
possible: the attributable configuration against 32 retrains of 1 % subsets (values and exact
values side by side), the default run's LDS over the whole run and over its last quarter, the
graded corpus's sources at training seeds 0-4 (bench/graded_sources.py), the attributability
verdict of the default and attributable runs at seeds 0-2, and v's response against the default
run's exact values. Runs and retrains in --store are reused, so an interrupted run resumes.
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

from graded_sources import pairwise, source_table  # noqa: E402
from graded_sources import run_seed as graded_run  # noqa: E402
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


ATTRIBUTABLE = yaml.safe_load((ROOT / "jobs/configs/attributable.yaml").read_text())
GRADED = ROOT / "jobs/configs/graded.yaml"


def job(store: str, run_id: str, settings: dict) -> Run:
    """The run in store, made if it is not there yet (finished)."""
    if (Path(store) / run_id / "values" / "samples.parquet").exists():
        return Run.open(store, run_id, mode="record")
    return run_job(store, run_id, settings)


def exact(run: Run) -> None:
    """`rayattr exact` on the run, once (its own process: float64, about 1.3 GB)."""
    import subprocess

    if not run.exists("exact/summary.json"):
        subprocess.run([sys.executable, "-m", "rayattr.cli", "exact", run.uri, "--format", "json"], check=True,
                       cwd=ROOT, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})


def seeded(settings: dict, seed: int) -> dict:
    return merge(settings, {"train": {"seed": seed}})


def against_exact(run: Run, window: tuple[int, int], subsets: int, fraction: float) -> tuple[float, float]:
    """(occurrence ρ in steps [window), subset ρ of 1 % subsets' sums in steps >= window[0]) of the
    values against the run's exact values."""
    import numpy as np

    cols = ["sample_id", "step", "value"]
    v = run.read_table("values/samples.parquet").select(cols).to_pandas()
    e = run.read_table("exact/samples.parquet").select(cols).to_pandas()
    m = v.merge(e, on=["sample_id", "step"], suffixes=("_v", "_e"))
    mid = m[(m.step >= window[0]) & (m.step < window[1])]
    late = m[m.step >= window[0]]
    by_v, by_e = late.groupby("sample_id").value_v.sum(), late.groupby("sample_id").value_e.sum()
    ids = by_v.index.to_numpy()
    rng = np.random.default_rng(0)
    k = max(1, round(fraction * len(ids)))
    picks = [rng.choice(ids, k, replace=False) for _ in range(subsets)]
    return (spearman(mid.value_v.tolist(), mid.value_e.tolist()),
            spearman([by_v.loc[p].sum() for p in picks], [by_e.loc[p].sum() for p in picks]))


def targets(store: str, subsets: int, progress: bool) -> None:
    """Issue 23's targets in one table (module docstring)."""
    rows: list[tuple[str, str, str, str]] = []  # (target, measured, bar, met)

    def ok(flag: bool) -> str:
        return "yes" if flag else "no"

    # 1. The attributable configuration against 1 % subsets, values and exact side by side.
    a0 = job(store, "attributable-s0", seeded(ATTRIBUTABLE, 0))
    exact(a0)
    s = validate_run(a0, subsets=subsets, fraction=0.01, sources=True, seed=0, progress=progress).summary
    lo = (s["lds_ci"] or [float("nan")])[0]
    rows.append(("attributable.yaml: LDS, 1 % subsets", f"{s['lds']:+.3f} [{lo:+.2f}, {s['lds_ci'][1]:+.2f}], "
                 f"exact {s['exact_lds']:+.3f}, sources {s['source_spearman']:+.2f}",
                 "≥ 0.9, lower ≥ 0.8, within 0.05 of exact",
                 ok(s["lds"] >= 0.9 and lo >= 0.8 and abs(s["lds"] - s["exact_lds"]) <= 0.05)))

    # 2. The window: the default run's LDS over its last quarter beside the whole run's.
    d0 = job(store, "default-s0", seeded({"train": {"states_every": 2}}, 0))
    exact(d0)
    n = int(d0.manifest["num_steps"])
    whole = validate_run(d0, subsets=subsets, fraction=0.01, seed=0, progress=progress).summary
    late = validate_run(d0, subsets=subsets, fraction=0.01, seed=0, window=f"{3 * n // 4}:",
                        progress=progress).summary
    rows.append(("default run: LDS whole / last quarter", f"{whole['lds']:+.3f} / {late['lds']:+.3f} "
                 f"(exact {whole['exact_lds']:+.3f} / {late['exact_lds']:+.3f})", "reported", "–"))

    # 3. Sources that truly differ: the graded corpus at seeds 0-4.
    graded = Path(store) / "graded"
    graded.mkdir(exist_ok=True)
    tables = [source_table(graded_run(GRADED, seed, graded)) for seed in range(5)]
    names = sorted(tables[0])
    per_seed = [spearman([t[x][0] for x in names], [t[x][1] for x in names]) for t in tables]
    truth, answer = pairwise([[t[x][1] for x in names] for t in tables]), pairwise([[t[x][0] for x in names] for t in tables])
    rows.append(("graded sources: predicted vs retrained, seeds 0-4", " ".join(f"{r:.2f}" for r in per_seed),
                 "≥ 0.9 at each seed", ok(min(per_seed) >= 0.9)))
    rows.append(("graded sources: pairwise ρ across seeds (min)", f"retrained {truth[0]:.3f}, predicted {answer[0]:.3f}",
                 "≥ 0.9 both", ok(min(truth[0], answer[0]) >= 0.9)))

    # 4. The verdict: default against attributable runs at seeds 0-2.
    scores = {}
    for name, settings in (("default", {}), ("attributable", ATTRIBUTABLE)):
        for seed in range(3):
            run = (d0 if (name, seed) == ("default", 0) else a0 if (name, seed) == ("attributable", 0)
                   else job(store, f"{name}-s{seed}", seeded(settings, seed)))
            scores[name, seed] = validate_run(run, smoothness=True, seed=0, progress=progress).summary["smoothness"]["score"]
    top = max(scores[("default", s)] for s in range(3))
    bottom = min(scores[("attributable", s)] for s in range(3))
    rows.append(("smoothness: default / attributable, seeds 0-2",
                 " ".join(f"{scores[('default', s)]:.2f}" for s in range(3)) + " / "
                 + " ".join(f"{scores[('attributable', s)]:.2f}" for s in range(3)), "no overlap", ok(top < bottom)))

    # 5. v's response at the AdamW default, against the exact values after the warm-up.
    dv = job(store, "default-s0-v", seeded({"train": {"states_every": 2}, "capture": {"v_response": True}}, 0))
    if not dv.exists("exact/summary.json"):  # same trajectory: the capture does not change training
        for name in d0.list("exact"):
            dv.write_bytes(f"exact/{name}", d0.read_bytes(f"exact/{name}"))
    window = (n // 4, 3 * n // 4)
    without, with_v = against_exact(d0, window, subsets, 0.01), against_exact(dv, window, subsets, 0.01)
    rows.append((f"v's response, default run vs exact: occurrences in [{window[0]}, {window[1]}) / subsets",
                 f"without {without[0]:+.2f} / {without[1]:+.2f}, with {with_v[0]:+.2f} / {with_v[1]:+.2f}",
                 "reported", "–"))

    width = [max(len(r[i]) for r in rows) for i in range(4)]
    print("  ".join(h.ljust(w) for h, w in zip(("target", "measured", "bar", "met"), width)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)))
    print(f"runs kept in {store}")


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
    p.add_argument("--targets", action="store_true", help="issue 23's targets in one table (--subsets: 32 at least)")
    args = p.parse_args()
    if args.store:
        os.makedirs(args.store, exist_ok=True)
    store = args.store or tempfile.mkdtemp(prefix="rayattr-fidelity-")
    if args.targets:
        return targets(store, max(32, args.subsets), progress=False)
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
