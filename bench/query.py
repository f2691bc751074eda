"""Query scoring throughput against the store's sequential read speed of the same embeddings.

    python bench/query.py                       # 4 layers x p=1024, 1000 steps x 16 rows (262 MB)
    python bench/query.py --steps 2000 --layers 9

Writes a synthetic run's final per-occurrence embeddings with GradientWriter (the layout
`rayattr query` reads), then, in one process: (1) reads them all with GradientReader.iter_steps
(the read bound), (2) scores them with rayattr.query.score_occurrences for 1 and for 64
query gradients at once. Prints rows/s and MB/s of each and scoring / reading.
Target: scoring runs at >= 70 % of the read throughput (it is bound by reading).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rayattr.store.layout import FINAL_KIND  # noqa: E402
from rayattr.query import embedding_reader, score_occurrences  # noqa: E402
from rayattr.store import GradientWriter, Run  # noqa: E402


def make_run(root: str, layers: dict[str, int], steps: int, batch: int) -> Run:
    run = Run.create(root, "bench", {"layers": layers, "status": "done"})
    gen = torch.Generator().manual_seed(0)
    pool = [{n: torch.randn(batch, p, generator=gen) for n, p in layers.items()} for _ in range(8)]
    with GradientWriter(run, 0, layers, kind=FINAL_KIND, steps_per_shard=32) as w:
        for step in range(steps):
            w.write_step(step, list(range(step * batch, (step + 1) * batch)), ["src"] * batch, pool[step % 8],
                         positions=list(range(batch)))
    return Run.open(root, "bench")


def time_read(run: Run, layers: list[str]) -> tuple[float, int]:
    t = time.perf_counter()
    rows = sum(len(b) for b in embedding_reader(run).iter_steps(layers=layers))
    return time.perf_counter() - t, rows


def time_score(run: Run, layers: dict[str, int], queries: int) -> tuple[float, int]:
    gen = torch.Generator().manual_seed(1)
    test = {n: torch.randn(queries, p, generator=gen, dtype=torch.float64) for n, p in layers.items()}
    t = time.perf_counter()
    occ = score_occurrences(run, test)
    return time.perf_counter() - t, len(occ)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=1024, help="p per layer (r*r)")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best of each is kept")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one query process per core, like a segment actor
    layers = {f"layer{i}": args.dim for i in range(args.layers)}
    mb = args.steps * args.batch * args.layers * args.dim * 4 / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(tmp, layers, args.steps, args.batch)
        print(f"{args.steps * args.batch} occurrences x {args.layers} layers x p={args.dim} float32 = {mb:.0f} MB, "
              f"local store, 1 thread")
        best: dict[str, float] = {}
        for _ in range(args.repeats):  # alternate, so both see the same page cache
            for name, fn in (("read", lambda: time_read(run, list(layers))),
                             ("score 1", lambda: time_score(run, layers, 1)),
                             ("score 64", lambda: time_score(run, layers, 64))):
                seconds, rows = fn()
                best[name] = min(best.get(name, float("inf")), seconds)
        read = best["read"]
        print(f"\n{'':>9} {'seconds':>8} {'rows/s':>10} {'MB/s':>7} {'vs read':>8}")
        for name, s in best.items():
            print(f"{name:>9} {s:>8.2f} {args.steps * args.batch / s:>10.0f} {mb / s:>7.0f} {read / s:>7.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
