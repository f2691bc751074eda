"""Peak memory of `rayattr query` as the run's occurrences grow 16x.

    python bench/query_memory.py                      # 1x = 1 M occurrences, 16x = 16 M
    python bench/query_memory.py --occurrences 250000 --growth 4
    python bench/query_memory.py --rayattr . /tmp/old # also another checkout's rayattr, same runs

Builds, without Ray, two finished runs of the quick config (jobs/configs/small.yaml: its data,
an untrained model of its shape saved as the final weights, one captured layer, lm_head, with
its projection blocks) whose final per-occurrence embeddings are written with the store's
GradientWriter: 1x and `growth`x occurrences, 2 epochs of distinct samples each (the
occurrences grow with the corpus, so per-sample totals would grow too). Each run
is queried by `rayattr query RUN --text ... --by-source --format json` in its own process;
its peak RSS is that process's ru_maxrss (os.wait4). Prints both and their ratio.
Target (issue 26): ratio <= 1.2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rayattr.store import Run  # noqa: E402

LAYER = "lm_head"
BATCH = 1024  # occurrences per step
EPOCHS = 2


def make_finished(root: str, run_id: str, rank: int) -> Run:
    """A finished run with data, final weights and the manifest a query reads; no embeddings."""
    from rayattr.config import load_config
    from rayattr.data import load_tokenizer
    from rayattr.embed.blocks import ProjectionBlocks
    from rayattr.pipeline.stages import create_run, prepare_data, write_data
    from rayattr.record.recorder import state_dict_bytes
    from rayattr.store import StoreOptions
    from rayattr.model.build import build_model

    cfg = load_config(ROOT / "jobs/configs/small.yaml", **{"store.uri": root, "run_id": run_id,
                                                           "capture.layers": [LAYER], "capture.rank": rank})
    run = create_run(cfg)
    write_data(cfg, run, prepare_data(cfg, StoreOptions(), connect_ray=False))
    model = build_model(cfg.model, load_tokenizer(cfg.data.tokenizer).vocab_size, cfg.data.seq_len,
                        seed=cfg.train.seed)
    run.write_bytes("weights/final.safetensors", state_dict_bytes(model))
    run.update_manifest(status="done", layer_dims={LAYER: rank * rank})
    ProjectionBlocks.register(run, cfg.embed.error_blocks, cfg.embed.joint_layers)
    return run


def make_run(root: str, run_id: str, rank: int, occurrences: int) -> tuple[str, float]:
    """A finished run with `occurrences` final embeddings (EPOCHS x distinct samples); returns
    its URI and the embeddings' bytes."""
    from rayattr.data.run_data import token_meta
    from rayattr.embed.blocks import ProjectionBlocks
    from rayattr.store.layout import FINAL_KIND
    from rayattr.store import GradientWriter

    run = make_finished(root, run_id, rank)
    blocks = ProjectionBlocks.for_run(run.manifest,
                                      run.manifest["config"]["embed"]["error_blocks"])
    dims = blocks.dims
    gen = torch.Generator().manual_seed(0)
    pool = [blocks.augment({LAYER: torch.randn(BATCH, dims[LAYER], generator=gen)}) for _ in range(7)]
    samples = occurrences // EPOCHS
    steps = occurrences // BATCH
    names = token_meta(run)["sources"]  # the run's own, so that --source takes them
    sources = [names[i % len(names)] for i in range(BATCH)]
    gen = torch.Generator().manual_seed(1)
    with GradientWriter(run, 0, dims, kind=FINAL_KIND, steps_per_shard=64) as w:
        for step in range(steps):
            first = (step * BATCH) % samples  # epoch e repeats the samples of epoch 0
            scale = 1 + 0.01 * torch.randn(1, generator=gen)  # no two steps alike
            w.write_step(step, list(range(first, first + BATCH)), sources,
                         {n: g * scale for n, g in pool[step % 7].items()}, positions=list(range(BATCH)))
    return run.uri, steps * BATCH * sum(dims.values()) * 4


def peak_rss(uri: str, code: Path, out: Path) -> tuple[float, float]:
    """Peak RSS (bytes) and wall seconds of one `rayattr query` process."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "rayattr.cli", "query", uri, "--text", "def parse(s): return s.split()",
           "--k", "10", "--by-source", "--format", "json", "--quiet"]
    t = time.perf_counter()
    with open(out, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=code)
        _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"rayattr query failed ({p.returncode}):\n{out.read_text()[-3000:]}")
    return usage.ru_maxrss * 1024, seconds  # ru_maxrss is in kB on Linux


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--occurrences", type=int, default=1 << 20, help="occurrences of the 1x run")
    p.add_argument("--growth", type=int, default=16)
    p.add_argument("--rank", type=int, default=4, help="projection rank of the one layer (p = rank^2)")
    p.add_argument("--rayattr", type=Path, nargs="+", default=[ROOT],
                   help="checkouts whose rayattr package runs the queries, each on the same runs")
    p.add_argument("--keep", help="build the runs here and keep them (default: a temporary directory)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    n1 = max(BATCH * EPOCHS, args.occurrences // (BATCH * EPOCHS) * BATCH * EPOCHS)
    root = args.keep or tempfile.mkdtemp(prefix="rayattr-query-memory-")
    try:
        t = time.perf_counter()
        runs = []
        for name, n in (("1x", n1), (f"{args.growth}x", n1 * args.growth)):
            uri, size = make_run(root, f"run-{name}", args.rank, n)
            runs.append((name, n, uri, size))
        print(f"built the runs in {time.perf_counter() - t:.0f} s")
        for code in [c.resolve() for c in args.rayattr]:
            print(f"\nqueries run by {code}/rayattr\n{'run':>4} {'occurrences':>12} {'embeddings':>11} "
                  f"{'query s':>8} {'peak RSS':>9}")
            peaks = []
            for name, n, uri, size in runs:
                rss, seconds = peak_rss(uri, code, Path(root) / f"{name}-{len(peaks)}.json")
                peaks.append(rss)
                print(f"{name:>4} {n:>12,} {size / 1e6:>8.0f} MB {seconds:>8.1f} {rss / 1e6:>6.0f} MB")
            print(f"peak RSS {args.growth}x / 1x: {peaks[1] / peaks[0]:.2f} (target <= 1.2)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
