"""Embedding-stage throughput with 1, 2 and 4 segment actors, against the run's training time.

    python bench/segments.py                          # the built-in default run (192 steps x 16 samples)
    python bench/segments.py --segments 1 2 4 8 --config jobs/configs/small.yaml
    python bench/segments.py --gpu                    # on a GPU machine: segment actors on GPUs

Trains one run (timed), then runs the embedding stage (segment actors: the backward sweep)
and the reduce stage (K chain, finalize, values) on copies of it with each segment count,
all in one process and one Ray. Prints samples/s of the embedding stage, the speed-up over
one segment, and embed / train and (embed + reduce) / train time ratios. "embed s" is the
stage's wall time (actor start-up included), "sweep s" the slowest actor's own recursion time.
Targets: the embedding stage takes less time than training; two segments >= 1.6x one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from rayattr.config import load_config  # noqa: E402
from rayattr.pipeline.stages import embed_and_reduce, create_run, write_data  # noqa: E402
from rayattr.train.trainer import train  # noqa: E402
from rayattr.store import Run  # noqa: E402

# what the embedding and reduce stages write: their own dirs, and the "local" and
# "embeddings" kinds under grads/, commits/ and writers/
EMBED_OUTPUTS = {"embed", "values", "embeddings", "local"}


def copy_trained(run: Run, dest: Path, name: str) -> Run:
    """The trained run without anything the embedding stage wrote."""
    shutil.copytree(run.uri, dest / name, ignore=lambda d, names: [n for n in names if n in EMBED_OUTPUTS])
    copy = Run.open(str(dest), name, mode="record")
    copy.update_manifest(status="trained", segments=None)
    return copy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run config (default: the built-in default run)")
    p.add_argument("--segments", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, help="cap on training steps")
    p.add_argument("--rank", type=int, help="projection rank r (p = r*r per layer); default: the config's")
    p.add_argument("--gpu", action="store_true")
    args = p.parse_args(argv)

    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    res = ray.cluster_resources()
    device = f"{int(res.get('GPU', 0))} GPU" if args.gpu else f"{int(res.get('CPU', 0))} CPU"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, **{"store.uri": os.path.join(tmp, "store"), "run_id": "trained",
                                          "train.steps": args.steps, "train.use_gpu": args.gpu or None,
                                          "capture.rank": args.rank})
        run = create_run(cfg)
        write_data(cfg, run)
        t0 = time.perf_counter()
        info = train(cfg, run, progress=False)
        train_s = time.perf_counter() - t0
        steps = info["num_steps"]
        occurrences = steps * info["global_batch"]
        dims = info["layer_dims"]
        print(f"run: {steps} steps x {info['global_batch']} samples, {len(dims)} layers x p={next(iter(dims.values()))}, "
              f"{cfg.train.ranks} ranks, on {device}")
        print(f"training: {train_s:.1f} s ({occurrences / train_s:.0f} samples/s)\n")
        print(f"{'segments':>8} {'embed s':>8} {'sweep s':>8} {'samples/s':>10} {'speed-up':>9} {'reduce s':>9} "
              f"{'embed/train':>12} {'(embed+reduce)/train':>21}")
        base = None
        for n in args.segments:
            copy = copy_trained(run, Path(tmp), f"seg{n}")
            out = embed_and_reduce(cfg, copy, steps, segments=n, progress=False)
            e, r = out.timings["embed"], out.timings["reduce"]
            base = base or e
            sweep = max(copy.reload_manifest()["segment_seconds"])  # slowest actor's own work
            print(f"{n:>8} {e:>8.2f} {sweep:>8.2f} {occurrences / e:>10.0f} {base / e:>8.2f}x {r:>9.2f} "
                  f"{e / train_s:>12.2f} {(e + r) / train_s:>21.2f}", flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
