"""Data path at 1x, 10x and 100x the corpus with training steps capped: unused data must cost nothing.

    python bench/data_scale.py                  # corpus 1x, 10x, 100x of the built-in 1536 rows, 24 steps
    python bench/data_scale.py --runs 3         # 3 whole jobs per size (BENCHMARKS.md's table)
    python bench/data_scale.py --factors 1 10 --steps 48
    python bench/data_scale.py --no-whole       # the data stage alone (seconds, not minutes)

1. The whole job (jobs/pretrain_attr.py: local Ray, local store, 2 segments) --runs times per
   corpus size (default once; sizes interleaved), watched by bench/scale.py's Poller: wall
   time, the run's own stage timings (manifest `timings`: data, train, embed, reduce, and the
   rest of the wall), and the peak RSS of the driver (VmHWM), of each rank actor (Ray Train
   worker), segment actor (its validation shard included) and the Ray Train controller, each against the 1x
   run (times the fastest run, peaks the largest). A whole run's time moves by tens of
   percent on a shared machine: one run per size cannot resolve a 1.2x ratio there.
2. The data path alone. For each corpus size, in fresh processes (so each peak is its own):
  driver: the data stage of a run (rayattr/data/stage.py: a Ray Data pipeline on a local Ray of
          2 CPUs reads, checks and tokenises the trained steps' rows, token shards into the run),
          as `start_run` does it; the driver's own CPU seconds (all its threads, Ray Data's
          executor included; the tasks run in Ray's workers) and the stage's rows per second
          per CPU (rows scanned / wall / CPUs);
  rank:   one rank's data path for every trained step (rank_tokens: its rows of each step);
  old rank: what a rank did before (the whole table read and tokenised, TokenizedDataset),
          for contrast.
Prints wall seconds (the fastest of 3, after imports), peak RSS (ru_maxrss) and the peak above
the RSS after imports (the data path's own memory) of each, and their ratios against 1x.
Targets: every process's peak RSS and the rank's wall time <= 1.2x at 10x and 100x (issue 13);
the driver's peak RSS <= 1.05x and its own CPU time <= 1.2x (issue 26: the stage's wall time may
grow with the rows, its work is O(rows), on the cluster's CPUs).
The corpus is the built-in training corpus repeated (each copy's texts made distinct) as
Parquet files in the store's filesystem, so the run records them instead of copying them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from itertools import zip_longest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPEATS = int(os.environ.get("DATA_SCALE_REPEATS", 3))
sys.path.insert(0, str(ROOT))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def write_corpus(path: Path, factor: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayattr.data import builtin_corpus

    train, val = builtin_corpus()
    path.mkdir(parents=True)
    texts = train["text"].to_pylist()
    for k in range(factor):  # one file per copy: the writer never holds the 100x table either
        pq.write_table(pa.table({"id": np.arange(train.num_rows) + k * train.num_rows, "source": train["source"],
                                 "text": texts if k == 0 else [f"{t} #{k}" for t in texts]}),
                       path / f"part-{k:04d}.parquet", row_group_size=4096)
    pq.write_table(val, path.parent / f"{path.name}-validation.parquet")


def config(data: Path, store: Path, steps: int):
    from rayattr.config import Config

    return Config().with_overrides(**{"data.train": str(data), "data.validation": f"{data}-validation.parquet",
                                      "train.steps": steps, "store.uri": str(store), "run_id": "r"}).validate()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(role: str, data: Path, store: Path, steps: int) -> dict:
    from rayattr.data import TokenizedDataset, load_dataset, load_tokenizer
    from rayattr.data.run_data import rank_tokens
    from rayattr.pipeline.stages import start_run
    from rayattr.store import Run

    if role == "driver":  # Ray started before the baseline: its start-up is not the stage's
        from rayattr.runtime.cluster import connect

        connect(log_to_driver=False)
    base = rss_mb()  # after the imports: what follows is the data path's own
    times, cpu = [], []
    for i in range(REPEATS):  # the fastest of a few: sub-second stages are noisy on a shared machine
        t, c = time.perf_counter(), time.process_time()
        if role == "driver":
            start_run(config(data, store, steps).with_overrides(run_id=f"r{i}"), connect_ray=True)
        elif role == "rank":
            tokens = rank_tokens(Run.open(str(store), "r0"), 0)
            for step in range(tokens.lay.num_steps):
                for micro in range(tokens.lay.grad_accum):
                    tokens.micro_batch(step, micro)
                tokens.share(step), tokens.step_ids(step)
        else:  # "old_rank", the old path: every rank read the whole training table and tokenised all of it
            TokenizedDataset(load_dataset(str(data)), load_tokenizer("byte"), 64)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    out = {"seconds": min(times), "cpu_s": min(cpu), "peak_mb": peak_mb(), "growth_mb": peak_mb() - base}
    if role == "driver":
        import ray

        out["rows_per_cpu_s"] = Run.open(str(store), "r0").manifest["n_train"] / min(times) / ray.cluster_resources()["CPU"]
    return out


def whole_runs(factors: list[int], steps: int, tmp: Path, runs: int = 1) -> None:
    """Part 1: the whole job `runs` times per corpus size (sizes interleaved); prints the table with
    ratios against the first size: times the fastest of the runs, each peak RSS the largest."""
    sys.path.insert(0, str(ROOT / "bench"))
    from scale import run_polled

    from rayattr.store import Run

    rows: dict[int, dict] = {}
    for k in range(runs):
        for f in factors:
            data, store = tmp / f"corpus{f}", tmp / f"wstore{f}"
            store.mkdir(exist_ok=True)
            if not data.exists():
                write_corpus(data, f)
            cfg = {"data": {"train": str(data), "validation": f"{data}-validation.parquet"},
                   "train": {"steps": steps}, "embed": {"segments": 2}}
            wall, poll = run_polled(str(store), f"w{k}", cfg)
            run = Run.open(str(store), f"w{k}")
            procs: dict[str, list[int]] = {}
            for group, _, peak in poll.per_process():
                procs.setdefault(group, []).append(peak)
            procs = {g: sorted(p, reverse=True) for g, p in procs.items()}  # largest first in each group
            timings = run.manifest.get("timings") or {}
            if f in rows:
                old = rows[f]
                wall = min(wall, old["wall"])
                timings = {s: min(v, old["timings"].get(s, v)) for s, v in timings.items()}
                procs = {g: [max(a, b) for a, b in zip_longest(procs.get(g, []), old["procs"].get(g, []), fillvalue=0)]
                         for g in dict.fromkeys([*old["procs"], *procs])}
            rows[f] = {"wall": wall, "timings": timings, "data": run.manifest.get("data"), "procs": procs}
            print(f"whole run {k + 1}/{runs} at corpus {f}x done ({wall:.0f} s)", file=sys.stderr, flush=True)
    base = rows[factors[0]]
    stages = ["data", "train", "embed", "reduce"]
    print(f"1. the whole job, corpus {', '.join(f'{f}x' for f in factors)} (1x = 1536 rows), {steps} steps x 16 "
          "rows, 2 ranks, 2 segments; "
          f"{'ONE run' if runs == 1 else f'{runs} runs (fastest time, largest peak)'} per size; "
          "s = wall seconds, MB = peak RSS (1e6 bytes); processes of a group largest first; "
          "rest = wall minus the stages (Python and Ray start-up, shut-down)")
    print(f"{'corpus':>7} {'what':>22} {'value':>8} {'x 1x':>6}")
    for f, row in rows.items():
        d = row["data"] or {}
        print(f"{str(f) + 'x':>7} {'data (manifest)':>22} {d.get('train')}, {d.get('files')} file(s), "
              f"{d.get('n_used')} rows used")
        cells = [("whole run s", row["wall"], base["wall"])]
        cells += [(f"{s} s", row["timings"].get(s, 0.0), base["timings"].get(s, 0.0)) for s in stages]
        cells.append(("rest s", row["wall"] - sum(row["timings"].get(s, 0.0) for s in stages),
                      base["wall"] - sum(base["timings"].get(s, 0.0) for s in stages)))
        for group, peaks in row["procs"].items():
            for i, peak in enumerate(peaks):
                b = base["procs"].get(group, [])
                name = group if len(peaks) == 1 else f"{group} {i}"
                cells.append((f"{name} MB", peak / 1e6, (b[i] if i < len(b) else 0) / 1e6))
        for name, v, b in cells:
            print(f"{str(f) + 'x':>7} {name:>22} {v:>8.2f} " + (f"{v / b:>5.2f}x" if b else "  (none at 1x)"))
    worst = {f: max(max(p) / max(base["procs"][g]) for g, p in row["procs"].items() if base["procs"].get(g))
             for f, row in rows.items()}
    print("largest peak-RSS ratio of any process group: "
          + ", ".join(f"{f}x {w:.2f}x" for f, w in worst.items()) + "; target <= 1.2x")


def measure(role: str, data: Path, store: Path, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", role, "--data", str(data), "--store", str(store),
                          "--steps", str(steps)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factors", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--steps", type=int, default=24, help="train.steps cap")
    p.add_argument("--no-old", action="store_true", help="skip the old whole-table rank path")
    p.add_argument("--no-whole", action="store_true", help="skip part 1, the whole job at each size")
    p.add_argument("--no-stage", action="store_true", help="skip part 2, the data path alone")
    p.add_argument("--runs", type=int, default=1, help="whole-job runs per corpus size (part 1)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, Path(args.data), Path(args.store), args.steps)))
        return 0
    roles = ["driver", "rank"] + ([] if args.no_old else ["old rank"])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_whole:
            whole_runs(args.factors, args.steps, Path(tmp), args.runs)
            if args.no_stage:
                return 0
            print()
        for f in args.factors:
            data, store = Path(tmp) / f"corpus{f}", Path(tmp) / f"store{f}"
            if not data.exists():
                write_corpus(data, f)
            rows[f] = {r: measure(r.replace(" ", "_"), data, store, args.steps) for r in roles}
            print(f"corpus {f}x done", file=sys.stderr, flush=True)
    base = rows[args.factors[0]]
    print(f"2. the data path alone: corpus of {args.factors[0]}x = 1536 rows, {args.steps} steps x 16 rows "
          "trained, 2 ranks; s = wall seconds after imports, MB = peak RSS, +MB = peak RSS above the RSS after imports")
    print("  cpu = the process's own CPU seconds (the driver's: Ray Data's executor in it; the stage's tasks run "
          "in Ray's workers); rows/s/CPU = rows scanned / wall / the local Ray's 2 CPUs")
    print(f"{'corpus':>7} {'process':>9} {'s':>7} {'ratio':>6} {'cpu':>6} {'ratio':>6} {'MB':>6} {'ratio':>6} "
          f"{'+MB':>7} {'ratio':>6} {'rows/s/CPU':>10}")
    for f, row in rows.items():
        for r in roles:
            m, b = row[r], base[r]
            rate = f"{m['rows_per_cpu_s']:>10.0f}" if "rows_per_cpu_s" in m else ""
            print(f"{str(f) + 'x':>7} {r:>9} {m['seconds']:>7.2f} {m['seconds'] / b['seconds']:>5.2f}x "
                  f"{m['cpu_s']:>6.2f} {m['cpu_s'] / b['cpu_s']:>5.2f}x "
                  f"{m['peak_mb']:>6.0f} {m['peak_mb'] / b['peak_mb']:>5.2f}x {m['growth_mb']:>7.1f} "
                  f"{m['growth_mb'] / max(b['growth_mb'], 1.0):>5.2f}x {rate}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
