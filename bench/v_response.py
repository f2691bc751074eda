"""v's response against the exact first-order response (docs/method.md §7, "v's response"; §10).

    PYTHONPATH=. python bench/v_response.py STORE [--rank K ...] [--seed S] [--config CONFIG] [--set KEY=VALUE ...]

Trains the job (default: jobs/configs/default.yaml) with `train.states_every: 2` and
`capture.v_response: true` once per SVD rank given (the rows are formed at the step's end, so
each rank is a recording of its own: same seed, same trajectory), runs `rayattr exact` on the
first (re-seated on the run's own states), and embeds a copy of it with v frozen (its y rows
read by nobody).
Prints, per window (the warm-up, steps 48–143, steps ≥ 144 of 192), each estimate's
Spearman and rms ratio against the exact values.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--rank", type=int, nargs="+", default=[1])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "jobs/configs/default.yaml"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides, the value as YAML (e.g. train.lr=5e-4)")
    args = ap.parse_args(argv)
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}

    import ray

    from rayattr.config import load_config
    from rayattr.pipeline.stages import embed_and_reduce, run_pipeline
    from rayattr.store import Run

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    estimates: dict[str, pd.DataFrame] = {}
    exact = None
    for k in args.rank:
        cfg = load_config(args.config, **{**overrides, "store.uri": args.store, "run_id": f"vresp-s{args.seed}-k{k}",
                                          "train.seed": args.seed, "train.states_every": 2,
                                          "capture.v_response": True, "capture.v_response_rank": k})
        result = run_pipeline(cfg, progress=False)
        run = Run.open_uri(result.uri)
        estimates[f"v's response, rank {k}"] = run.read_table("values/samples.parquet").to_pandas()
        if exact is None:
            out = subprocess.run([sys.executable, "-m", "rayattr.cli", "exact", result.uri], capture_output=True,
                                 text=True)
            if out.returncode:
                sys.stderr.write(out.stderr[-3000:])
                return 1
            exact = run.read_table("exact/samples.parquet").to_pandas()
            # the same recording embedded with v frozen: its y rows are read by nobody
            frozen_dir = Path(args.store) / "frozen"
            frozen_dir.mkdir(exist_ok=True)
            skip = {"embed", "values", "embeddings", "local", "exact"}
            shutil.copytree(result.uri, frozen_dir / run.run_id, ignore=lambda d, names: [n for n in names if n in skip])
            copy = Run.open(str(frozen_dir), run.run_id, mode="record")
            embed_and_reduce(cfg.with_overrides(**{"capture.v_response": False}), copy, result.num_steps,
                             progress=False)
            estimates["v frozen"] = copy.read_table("values/samples.parquet").to_pandas()
            peak = int(np.argmax([r.lr for r in run.step_records()]))
    ray.shutdown()
    steps = int(exact["step"].max()) + 1
    windows = {f"warm-up (< {peak})": (0, peak), "steps 48-143": (steps // 4, 3 * steps // 4),
               f"steps >= {3 * steps // 4}": (3 * steps // 4, steps), "all": (0, steps)}
    ref = exact[["sample_id", "step", "value"]].rename(columns={"value": "exact"})
    print(f"seed {args.seed}: Spearman / rms ratio against rayattr exact")
    print(f"{'estimate':<26}" + "".join(f"{w:>22}" for w in windows))
    for name, table in estimates.items():
        joined = table[["sample_id", "step", "value"]].merge(ref, on=["sample_id", "step"])
        assert len(joined) == len(ref) == len(table)
        cells = []
        for a, b in windows.values():
            part = joined[(joined.step >= a) & (joined.step < b)]
            rms = float(np.sqrt((part.value ** 2).mean() / (part.exact ** 2).mean()))
            cells.append(f"{spearman(part.value.to_numpy(), part.exact.to_numpy()):+.3f} / {rms:.3g}")
        print(f"{name:<26}" + "".join(f"{c:>22}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
