"""Gradient store throughput: write and read MB/s, local files and SeaweedFS S3, float32 and bf16.

    python bench/store_throughput.py            # ~200 MB of float32 gradients per configuration
    python bench/store_throughput.py --mb 50 --backends local

Write time runs from the first write_step to close() returning (every shard uploaded and
committed); read time is GradientReader.iter_steps over all steps, returning float32 tensors
with checksums verified. MB are stored bytes (bf16 stores half). Also compares the shard
encodings (Arrow IPC vs Parquet) in memory, which is why shards are Arrow IPC.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3server import SeaweedS3  # noqa: E402

from rayattr.store import GradientReader, GradientWriter, Run, StoreOptions  # noqa: E402
from rayattr.store.shard import shard_schema, step_batch  # noqa: E402


def make_pool(layers: dict[str, int], batch: int, n: int = 8) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [{k: torch.randn(batch, p, generator=gen) for k, p in layers.items()} for _ in range(n)]


def run_one(root: str, options: StoreOptions, dtype: str, layers, batch, steps, spshard,
            pool) -> tuple[float, float, int]:
    run = Run.create(root, f"bench-{dtype}", {"layers": layers}, options=options)
    ids = list(range(batch))
    sources = ["bench"] * batch
    t0 = time.perf_counter()
    with GradientWriter(run, 0, layers, dtype=dtype, steps_per_shard=spshard,
                        queue_depth=4) as w:
        for s in range(steps):
            w.write_step(s, ids, sources, pool[s % len(pool)], positions=ids)
    t_write = time.perf_counter() - t0
    commits = run._storage.get_many(run._storage.find("commits/train"))
    stored = sum(json.loads(c)["bytes"] for c in commits)
    t0 = time.perf_counter()
    rows = 0
    for b in GradientReader(run).iter_steps(dtype=torch.float32):
        rows += len(b)
    t_read = time.perf_counter() - t0
    assert rows == steps * batch, (rows, steps * batch)
    return stored / t_write / 1e6, stored / t_read / 1e6, stored


def encoding_comparison(layers, batch, pool, steps=64) -> tuple[float, float, float, float]:
    """In-memory MB/s of writing/reading one shard as Arrow IPC vs Parquet (no I/O)."""
    schema = shard_schema(layers, "float32", "train")
    batches = [step_batch(schema, s, 0, list(range(batch)), ["b"] * batch, list(range(batch)),
                          pool[s % len(pool)], "float32") for s in range(steps)]
    mb = sum(b.nbytes for b in batches) / 1e6

    def ipc_write():
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, schema) as w:
            for b in batches:
                w.write_batch(b)
        return sink.getvalue()

    def pq_write():
        sink = io.BytesIO()
        with pq.ParquetWriter(sink, schema, compression="none", use_dictionary=False) as w:
            for b in batches:
                w.write_batch(b)
        return sink.getvalue()

    def timed(fn, reps=3):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn()
        return (time.perf_counter() - t0) / reps, out

    tw_ipc, ipc = timed(ipc_write)
    tw_pq, pqb = timed(pq_write)
    def decode(table: pa.Table):  # every gradient column to one contiguous numpy array
        return [table.column(k).combine_chunks().flatten().to_numpy() for k in layers]

    tr_ipc, _ = timed(lambda: decode(pa.ipc.open_file(ipc).read_all()))
    tr_pq, _ = timed(lambda: decode(pq.read_table(pa.BufferReader(pqb))))
    return mb / tw_ipc, mb / tr_ipc, mb / tw_pq, mb / tr_pq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=200, help="float32 MB of gradients per config")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--p", type=int, default=1024, help="projected dim per layer")
    ap.add_argument("--batch", type=int, default=16, help="rows per step")
    ap.add_argument("--steps-per-shard", type=int, default=16)
    ap.add_argument("--backends", default="local,s3")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()

    layers = {f"layer{i}": args.p for i in range(args.layers)}
    step_mb = args.layers * args.p * args.batch * 4 / 1e6
    steps = max(1, int(args.mb / step_mb))
    pool = make_pool(layers, args.batch)
    print(f"shape: {args.layers} layers x p={args.p}, batch {args.batch}/step, {steps} steps "
          f"({steps * step_mb:.0f} MB float32), {args.steps_per_shard} steps/shard, 1 writer")

    ipc_w, ipc_r, pq_w, pq_r = encoding_comparison(layers, args.batch, pool)
    print(f"encoding in memory (MB/s): Arrow IPC write {ipc_w:.0f} read {ipc_r:.0f} | "
          f"Parquet write {pq_w:.0f} read {pq_r:.0f}")

    results = []
    with tempfile.TemporaryDirectory(prefix="rayattr-bench-") as tmp:
        server = None
        try:
            for backend in args.backends.split(","):
                if backend == "local":
                    root, options = str(Path(tmp) / "local"), StoreOptions()
                elif backend == "s3":
                    if server is None:
                        server = SeaweedS3(Path(tmp) / "seaweedfs").start()
                    root = server.root_uri("bench")
                    options = StoreOptions(storage_options=server.storage_options)
                else:
                    raise SystemExit(f"unknown backend {backend!r}")
                for dtype in args.dtypes.split(","):
                    w, r, stored = run_one(root, options, dtype, layers, args.batch, steps,
                                           args.steps_per_shard, pool)
                    results.append((backend, dtype, stored / 1e6, w, r))
                    print(f"  {backend:5s} {dtype:8s} done", flush=True)
        finally:
            if server is not None:
                server.stop()

    print()
    print("| backend | dtype | stored MB | write MB/s | read MB/s | read/write |")
    print("|---|---|---|---|---|---|")
    for backend, dtype, mb, w, r in results:
        print(f"| {backend} | {dtype} | {mb:.0f} | {w:.0f} | {r:.0f} | {r / w:.2f} |")


if __name__ == "__main__":
    main()
