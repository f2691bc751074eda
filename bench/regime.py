"""Where are the values right? A regime map against the run's own exact first-order response.

    python bench/regime.py                          # the grid below, on small.yaml's corpus
    python bench/regime.py --only sgd-0.05 adamw-1e-4 --smoothness
    python bench/regime.py --list

Each setting trains the built-in job (jobs/pretrain_attr.py, its own local Ray) with a few
keys changed from a base config, then runs `rayattr exact` on it: the float64 replay's
−∂ℓ_val/∂w of every occurrence, which matches the run's own retrains at small ε where the
replay follows the run (docs/method.md §10). Against it, in one table:

- **occurrences**: Spearman and rms ratio (values ÷ exact) over every occurrence, and over the
  last quarter of the steps;
- **last step**: the same at the final step alone, where the recursion has nothing to carry
  (K is the identity there), so what is left is the projection, the layers that are not
  captured, and the clip factor's own response;
- **subsets**: Spearman between the values' and the exact values' sums over `--subsets`
  random subsets of `--fraction` of the samples (every occurrence of each): the LDS the values
  would reach if retraining were exactly first order, which on a smooth run it is;
- **η·λ**: the largest η·λ_max(P H) the segment actors measured, and the share of steps at
  which gradient clipping acted;
- for AdamW settings, the same against the exact response with Adam's v held (`rayattr exact
  --hold v`), the response the pipeline's recursion linearises;
- with `--smoothness`, the attributability check's score and verdict (`rayattr validate
  --smoothness`: 4 retrains each).

Nothing here is tuned: the grid is fixed below, and a setting is "attributable" only by the
smoothness check, never by how well the values did.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "jobs" / "configs" / "small.yaml"

NO_CLIP = {"zero_optimization": {"stage": 1}, "gradient_clipping": 0.0}
CLIP = {"zero_optimization": {"stage": 1}, "gradient_clipping": 1.0}
SGD = {"type": "sgd"}
ADAMW = {"type": "adamw"}

# name -> (train.lr, optimizer, deepspeed, capture.rank, extra train keys)
GRID: dict[str, tuple] = {
    "sgd-0.3-clip": (0.3, SGD, CLIP, 16, {}),
    "sgd-0.3": (0.3, SGD, NO_CLIP, 16, {}),
    "sgd-0.05": (0.05, SGD, NO_CLIP, 16, {}),
    "sgd-0.05-r32": (0.05, SGD, NO_CLIP, 32, {}),
    "sgd-0.01-r32": (0.01, SGD, NO_CLIP, 32, {}),
    "sgd-0.05-b64": (0.05, SGD, NO_CLIP, 16, {"grad_accum": 4, "epochs": 8}),  # 16 steps of 64
    "adamw-1e-3-clip": (1e-3, ADAMW, CLIP, 16, {}),
    "adamw-1e-3": (1e-3, ADAMW, NO_CLIP, 16, {}),
    "adamw-1e-4": (1e-4, ADAMW, NO_CLIP, 16, {}),
    "adamw-1e-3-eps1e-3": (1e-3, {"type": "adamw", "eps": 1e-3}, NO_CLIP, 16, {}),
}


def config_for(base: dict, setting: tuple) -> dict:
    lr, optimizer, deepspeed, rank, train_extra = setting
    cfg = copy.deepcopy(base)
    cfg.setdefault("train", {}).update(lr=lr, optimizer=dict(optimizer), deepspeed=copy.deepcopy(deepspeed),
                                       **train_extra)
    cfg.setdefault("capture", {})["rank"] = rank
    cfg.setdefault("embed", {})["dtype"] = "float64"  # the recursion's own rounding out of the way
    return cfg


def run_cli(args: list[str], log: Path) -> None:
    with open(log, "a") as out:
        subprocess.run(args, check=True, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def clipped_share(run_dir: Path) -> float | None:
    """Share of steps whose recorded clip factor is below 1."""
    kappas = []
    for f in sorted((run_dir / "steps").glob("*.parquet")):
        t = pq.read_table(f)
        if "clip" in t.column_names:
            kappas += [float(x) for x in t.column("clip").to_pylist() if x is not None]
    return float(np.mean(np.asarray(kappas) < 1.0 - 1e-9)) if kappas else None


def agreement(v: np.ndarray, e: np.ndarray) -> tuple[float, float]:
    if len(v) < 3:
        return float("nan"), float("nan")
    return float(spearmanr(v, e)[0]), float(np.sqrt(np.mean(v ** 2) / max(np.mean(e ** 2), 1e-300)))


def measure(run_dir: Path, subsets: int, fraction: float, seed: int) -> dict:
    values = pq.read_table(run_dir / "values" / "samples.parquet", columns=["sample_id", "step", "value"]).to_pandas()
    exact = pq.read_table(run_dir / "exact" / "samples.parquet", columns=["sample_id", "step", "value"]).to_pandas()
    m = values.merge(exact, on=["sample_id", "step"], suffixes=("_v", "_e"))
    if len(m) != len(values) or len(m) != len(exact):
        raise RuntimeError(f"{run_dir}: values and exact values name different occurrences")
    last_step = int(m.step.max())
    quarter = m[m.step >= 0.75 * (last_step + 1)]
    final = m[m.step == last_step]
    ids = np.unique(m.sample_id.to_numpy())
    rng = np.random.default_rng(seed)
    k = max(1, round(fraction * len(ids)))
    sums_v, sums_e = [], []
    by_id_v = m.groupby("sample_id").value_v.sum()
    by_id_e = m.groupby("sample_id").value_e.sum()
    for _ in range(subsets):
        chosen = rng.choice(ids, k, replace=False)
        sums_v.append(by_id_v.loc[chosen].sum())
        sums_e.append(by_id_e.loc[chosen].sum())
    manifest = json.loads((run_dir / "run.json").read_text())
    out = {"occurrences": len(m)}
    out["all"] = agreement(m.value_v.to_numpy(), m.value_e.to_numpy())
    out["last quarter"] = agreement(quarter.value_v.to_numpy(), quarter.value_e.to_numpy())
    out["last step"] = agreement(final.value_v.to_numpy(), final.value_e.to_numpy())
    out["subsets"] = float(spearmanr(sums_v, sums_e)[0]) if subsets >= 3 else float("nan")
    out["eta_lambda"] = manifest.get("max_eta_lambda")
    out["clipped"] = clipped_share(run_dir)
    summary = json.loads((run_dir / "exact" / "summary.json").read_text())
    out["replay_departs_at"] = summary.get("replay_departs_at")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(BASE), help="base config (default: jobs/configs/small.yaml)")
    p.add_argument("--only", nargs="*", help="settings to run (default: all; --list names them)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--subsets", type=int, default=64)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoothness", action="store_true", help="also the attributability check (4 retrains each)")
    p.add_argument("--store", default=None, help="keep the runs here (default: a temporary directory)")
    args = p.parse_args()
    if args.list:
        for name, s in GRID.items():
            print(name, s)
        return
    names = args.only or list(GRID)
    unknown = set(names) - set(GRID)
    if unknown:
        sys.exit(f"unknown settings {sorted(unknown)}; --list names them")
    base = yaml.safe_load(Path(args.base).read_text()) or {}
    store = Path(args.store or tempfile.mkdtemp(prefix="rayattr-regime-"))
    store.mkdir(parents=True, exist_ok=True)
    log = store / "regime.log"
    rows = []
    for name in names:
        t0 = time.perf_counter()
        cfg_path = store / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(config_for(base, GRID[name])))
        run_dir = store / name
        if not (run_dir / "values" / "samples.parquet").exists():
            run_cli([sys.executable, "jobs/pretrain_attr.py", "--config", str(cfg_path), "--store", str(store),
                     "--run-id", name, "--no-progress"], log)
        if not (run_dir / "exact" / "summary.json").exists():
            run_cli([sys.executable, "-m", "rayattr.cli", "exact", str(run_dir), "--no-progress"], log)
        row = {"setting": name, **measure(run_dir, args.subsets, args.fraction, args.seed)}
        if GRID[name][1]["type"] == "adamw":  # the same run against the response with v held
            held = store / f"{name}-v-held"
            if not (held / "exact" / "summary.json").exists():
                shutil.rmtree(held, ignore_errors=True)
                shutil.copytree(run_dir, held, ignore=shutil.ignore_patterns("exact"))
                run_cli([sys.executable, "-m", "rayattr.cli", "exact", str(held), "--hold", "v", "--no-progress"], log)
            row["v held"] = measure(held, args.subsets, args.fraction, args.seed)
        if args.smoothness:
            run_cli([sys.executable, "-m", "rayattr.cli", "validate", str(run_dir), "--smoothness", "--no-progress"],
                    log)
            sm = json.loads((run_dir / "validation" / "smoothness.json").read_text())
            row["smoothness"] = (sm.get("score"), sm.get("attributable"))
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_table(rows, args)
    print(f"runs kept in {store}")


def print_table(rows: list[dict], args) -> None:
    head = ("| setting | η·λ max | clipped | occurrences (Spearman / rms) | last quarter | last step | "
            f"subsets ({args.subsets} × {args.fraction:g}) |" + (" smoothness |" if args.smoothness else ""))
    print(head)
    print("|" + "---|" * (head.count("|") - 1))

    def pair(x):
        return f"{x[0]:+.2f} / {x[1]:.2f}"

    for r in rows:
        el = f"{r['eta_lambda']:.2f}" if r.get("eta_lambda") is not None else "–"
        cl = f"{r['clipped']:.0%}" if r.get("clipped") is not None else "–"
        line = (f"| {r['setting']} | {el} | {cl} | {pair(r['all'])} | {pair(r['last quarter'])} | "
                f"{pair(r['last step'])} | {r['subsets']:+.2f} |")
        if args.smoothness:
            score, yes = r["smoothness"]
            line += f" {score:.2f} ({'yes' if yes else 'no'}) |"
        print(line)
        if "v held" in r:  # the pipeline freezes v: the same values against the response with v held
            h = r["v held"]
            print(f"| … against exact with v held | | | {pair(h['all'])} | {pair(h['last quarter'])} | "
                  f"{pair(h['last step'])} | {h['subsets']:+.2f} |" + (" |" if args.smoothness else ""))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
