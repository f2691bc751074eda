"""Bounded memory as a run grows, and the reduce's cost against the segment count (issue 13).

    python bench/scale.py                       # steps 8 / 32 / 128 at rank 32; 1, 4, 16, 64 segments
    python bench/scale.py --base-steps 16 --segments 1 4 16

1. **Steps 1x, 4x, 16x at projection rank 32** (2 segments, so a segment's steps grow the
   same): the whole job (jobs/pretrain_attr.py) in its own process and local Ray, three
   times. A poller reads the peak RSS of the driver (VmHWM in /proc) and samples every Ray
   worker process's RSS, grouped by what it runs (rank actors, segment actors, validation
   tasks), and prints each group's peak against the 1x run with wall time. Target: every
   process <= 1.3x; time grows with the steps. The plan's figure for a segment actor
   (rayattr/plan/estimate.py) is printed beside the measured one.
2. **Reduce cost against segments**: the 16x run's trained store, embedded with 1, 4, 16, 64
   segments by SegmentWorker objects in this process (64 actor processes would not fit this
   machine); timed separately: the vector chain through the workers, the suffix scan for the
   final embeddings, finalize, and the driver's write_outputs, with this process's peak RSS
   growth. The scan runs as the pipeline runs it (math/dvemb.suffix_scan, each combine by the
   worker the pipeline gives it), one combine at a time here; it is reported as its total work
   and its critical path: the slowest scan_link plus, per round, the slowest combine, i.e. its
   wall time with one CPU per actor (object transfers between actors not included). Beside
   it, the sequential chain the pipeline ran before (the same combines, one segment after the
   other from the last: n - 2 of them), timed on the same links, and the total work of the
   schedule the pipeline takes when the actors share 2 devices (this machine: blocks, about
   2n combines). All are run --repeats times; each combine (each whole chain) counts its
   fastest repeat.

    python bench/scale.py --reduce-only --rank 16   # part 2 only (trains just the 16x run)
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

from rayattr.config import Config  # noqa: E402
from rayattr.math.dvemb import compose_links, segment_bounds, suffix_scan  # noqa: E402
from rayattr.embed.blocks import ProjectionBlocks  # noqa: E402
from rayattr.embed.segment import SegmentSpec, SegmentWorker  # noqa: E402
from rayattr.plan.estimate import estimate  # noqa: E402
from rayattr.model.gradients import validation_gradient  # noqa: E402
from rayattr.optim.spec import resolve_optimizer  # noqa: E402
from rayattr.reduce import write_outputs  # noqa: E402
from rayattr.store import Run  # noqa: E402

# Ray's process titles name the actor class or the task: what each group runs. The ranks run
# as Ray Train workers (RayTrainWorker, rayattr/train/trainer.py), RankWorker where one is an
# actor of its own; Ray Train's controller actor drives them.
GROUPS = {"rank actor": ("RayTrainWorker", "RankWorker"), "segment actor": ("SegmentWorker",),
          "train controller": ("TrainController",)}
FORK = " (forked child)"
EMBED_OUTPUTS = {"embed", "values", "embeddings", "local"}


def peak_rss(pid: int) -> int:
    """VmHWM: the process's peak resident set so far, in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Poller(threading.Thread):
    """Every `every` s: the job process's peak RSS (VmHWM), and for each Ray worker process the
    largest RSS sampled while its title names a group. Ray reuses idle worker processes, so a
    worker's own high-water mark may come from an earlier task; sampling keeps each figure to
    the group running at the time (a peak shorter than `every` can be missed). A child forked
    by a group's process shares its pages and title until it execs: it is counted apart, as
    "<group> (forked child)", not as one more process of the group."""

    def __init__(self, pid: int, every: float = 0.1):
        super().__init__(daemon=True)
        self.root, self.every, self.stop = pid, every, threading.Event()
        self.peaks: dict[tuple[int, str], int] = {}  # (pid, group) -> peak bytes

    def group(self, proc: psutil.Process) -> str | None:
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            return None
        return next((g for g, names in GROUPS.items() if any(n in title for n in names)), None)

    def run(self) -> None:
        root = psutil.Process(self.root)
        while not self.stop.is_set():
            try:
                self.peaks[(self.root, "driver")] = max(peak_rss(self.root), self.peaks.get((self.root, "driver"), 0))
                procs = root.children(recursive=True)
            except psutil.Error:
                return
            groups = {p.pid: self.group(p) for p in procs}
            for p in procs:
                g = groups[p.pid]
                if g is None:
                    continue
                try:
                    if groups.get(p.ppid()) == g:  # a fork (e.g. a subprocess about to exec) has its parent's title
                        g += FORK
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                self.peaks[(p.pid, g)] = max(rss, self.peaks.get((p.pid, g), 0))
            time.sleep(self.every)

    def per_process(self) -> list[tuple[str, int, int]]:
        """(group, pid, peak bytes) of every process seen, driver first, then by group and pid;
        a process forked by a group's process (same title) is in group "<group> (forked child)"."""
        order = ["driver", *GROUPS]
        return sorted(((g, pid, peak) for (pid, g), peak in self.peaks.items()),
                      key=lambda x: (order.index(x[0].removesuffix(FORK)), x[0].endswith(FORK), x[1]))

    def by_group(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (_, g), peak in self.peaks.items():
            out[g] = max(out.get(g, 0), peak)
        return out


def settings(steps: int, rank: int, segments: int) -> dict:
    return {"capture": {"rank": rank}, "train": {"steps": steps}, "embed": {"segments": segments},
            "store": {"steps_per_shard": 8}}


def run_measured(store: str, run_id: str, cfg: dict) -> tuple[float, dict[str, int]]:
    """The job in its own process; (wall seconds, peak RSS per group)."""
    wall, poll = run_polled(store, run_id, cfg)
    return wall, poll.by_group()


def run_polled(store: str, run_id: str, cfg: dict) -> tuple[float, Poller]:
    """The job (jobs/pretrain_attr.py) on config dict `cfg` in its own process and local Ray;
    (wall seconds, the Poller that watched it: peak RSS per process)."""
    path = Path(store) / f"{run_id}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "jobs/pretrain_attr.py", "--config", str(path), "--store", store,
                             "--run-id", run_id, "--no-progress"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    poll = Poller(proc.pid)
    poll.start()
    _, err = proc.communicate()
    poll.stop.set()
    poll.join()
    if proc.returncode:
        sys.exit(err[-3000:])
    return time.perf_counter() - t, poll


def copy_trained(run: Run, dest: Path, name: str) -> Run:
    shutil.copytree(run.uri, dest / name, ignore=lambda d, names: [n for n in names if n in EMBED_OUTPUTS])
    return Run.open(str(dest), name, mode="record")


def reduce_cost(run: Run, n_seg: int, test_grad: dict, repeats: int = 3) -> dict[str, float]:
    """Embed `run` with n_seg in-process segment workers, then time the reduce's parts."""
    cfg = Config.from_dict(run.manifest["config"])
    steps = run.manifest["num_steps"]
    ProjectionBlocks.register(run, cfg.embed.error_blocks, cfg.embed.joint_layers)
    edges = segment_bounds(steps, cfg.embed.phases)
    bounds = segment_bounds(steps, n_seg)
    opt = resolve_optimizer(cfg)  # as the pipeline's segments: AdamW's update rows and β₁ (R in the scan)
    workers = [SegmentWorker(run.uri, None, SegmentSpec(i, a, b), edges, cfg.capture.curvature == "sampled",
                             dtype=cfg.embed.dtype, error_blocks=cfg.embed.error_blocks, updates=opt.adamw,
                             momentum=opt.beta1)
               for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    t0 = time.perf_counter()
    for w in workers:
        w.compute()
    t1 = time.perf_counter()
    vectors = [None] * n_seg
    vectors[-1] = workers[-1].value_vectors(test_grad)
    for ell in range(n_seg - 1, 0, -1):
        vectors[ell - 1] = workers[ell].chain_vectors(vectors[ell])
    t2 = time.perf_counter()
    scan = suffix_scan_cost(workers, repeats)
    # as the actors do: each finalises with its link, then lets go of its K
    fin = 0.0
    for w, v, link in zip(workers, vectors, scan.pop("links")):
        a = time.perf_counter()
        w.finalize(v, link)
        w._chain_inputs = None
        fin += time.perf_counter() - a
    t4 = time.perf_counter()
    write_outputs(run, n_seg, edges)
    t5 = time.perf_counter()
    return {"embed": t1 - t0, "vector chain": t2 - t1, **scan, "finalize": fin, "write_outputs": t5 - t4}


def suffix_scan_cost(workers: list, repeats: int = 3) -> dict:
    """The suffix scan of the pipeline (rayattr/pipeline/stages.py) through the workers, one
    combine at a time, `repeats` times (each combine's and the sequential chain's fastest
    repeat count: the CPUs are shared): its total work, its critical path (the slowest
    scan_link, then per round the slowest combine), its rounds, and the sequential chain's
    time on the same links, and the total work of the schedule for actors sharing 2 devices
    (suffix_scan at width 2); and the links, [M_{n-1} ⋯ M_{ℓ+1} for each ℓ] + [None]."""
    own, link_s = [], []
    for w in workers[1:]:
        a = time.perf_counter()
        own.append(w.scan_link())
        link_s.append(time.perf_counter() - a)
    best: dict[tuple[int, int], float] = {}  # (round, i) -> fastest combine
    sequential = two = float("inf")
    links: list = []
    for _ in range(repeats):
        links = []  # the previous repeat's go first
        # the chain the pipeline ran before: the same combines from the last segment backwards
        a = time.perf_counter()
        link = own[-1] if own else None
        for i in range(len(own) - 2, -1, -1):
            link = compose_links(link, own[i])
        sequential = min(sequential, time.perf_counter() - a)
        del link
        state = {"round": -1, "last": len(own)}

        def combine(i, later, mine):
            if i <= state["last"]:  # each round's combines come in increasing i, from 0
                state["round"] += 1
            state["last"] = i
            a = time.perf_counter()
            out = workers[i + 1].compose_links(later, mine)
            key = (state["round"], i)
            best[key] = min(best.get(key, float("inf")), time.perf_counter() - a)
            return out

        links = suffix_scan(own, combine) + [None]
        # the schedule the pipeline takes when the actors share 2 devices (this machine)
        a = time.perf_counter()
        suffix_scan(own, lambda i, later, mine: workers[i + 1].compose_links(later, mine), width=2)
        two = min(two, time.perf_counter() - a)
    rounds = sorted({r for r, _ in best})
    path = max(link_s, default=0.0) + sum(max(t for (r, _), t in best.items() if r == d) for d in rounds)
    return {"sequential chain": sequential if own else 0.0, "scan rounds": len(rounds),
            "scan work": sum(link_s) + sum(best.values()), "scan path": path,
            "width 2 work": sum(link_s) + (two if own else 0.0), "links": links}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-steps", type=int, default=8, help="the 1x run's steps (4x and 16x follow)")
    p.add_argument("--rank", type=int, default=32, help="projection rank r (p = r*r per layer)")
    p.add_argument("--segments", type=int, nargs="+", default=[1, 4, 16, 64], help="segment counts for the reduce")
    p.add_argument("--reduce-only", action="store_true", help="part 2 only: train just the 16x run")
    p.add_argument("--repeats", type=int, default=3, help="runs of the suffix scan and sequential chain (fastest counts)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        os.makedirs(store)
        if args.reduce_only:
            steps = args.base_steps * 16
            print(f"training the {steps}-step run at projection rank {args.rank}")
            run_measured(store, "s16", settings(steps, args.rank, 2))
        else:
            steps = memory_against_steps(store, args)
        reduce_against_segments(store, tmp, steps, args.segments, args.repeats)
    return 0


def memory_against_steps(store: str, args) -> int:
    """Part 1; returns the 16x run's steps."""
    print(f"1. steps 1x/4x/16x at projection rank {args.rank}, 2 segments (peak RSS per process, x the 1x run)")
    rows, base = [], None
    for mult in (1, 4, 16):
        steps = args.base_steps * mult
        wall, peaks = run_measured(store, f"s{mult}", settings(steps, args.rank, 2))
        run = Run.open(store, f"s{mult}")
        plan = estimate(Config.from_dict(run.manifest["config"]), segments=2)
        rows.append((mult, steps, wall, peaks, plan.process_memory["segment actor"]))
        base = base or (wall, peaks)
    groups = ["driver", *GROUPS]
    print(f"{'steps':>6} {'wall s':>7} {'x':>5} " + " ".join(f"{g + ' MB':>18} {'x':>5}" for g in groups)
          + f" {'plan: segment MB':>17}")
    for mult, steps, wall, peaks, planned in rows:
        cells = " ".join(f"{peaks.get(g, 0) / 1e6:>18.0f} {peaks.get(g, 0) / max(1, base[1].get(g, 0)):>5.2f}"
                         for g in groups)
        print(f"{steps:>6} {wall:>7.1f} {wall / base[0]:>5.2f} {cells} {planned / 1e6:>17.0f}")
    return rows[-1][1]


def reduce_against_segments(store: str, tmp: str, steps: int, segments: list[int], repeats: int) -> None:
    """Part 2 on the trained run "s16"."""
    print(f"\n2. reduce cost against segments (the {steps}-step run, in-process segment workers)")
    trained = Run.open(store, "s16", mode="record")
    test_grad = validation_gradient(trained)
    print(f"{'segments':>8} {'embed s':>8} {'vector chain s':>15} {'sequential chain s':>19} {'scan rounds':>12} "
          f"{'scan work s':>12} {'scan path s':>12} {'seq/path':>9} {'width-2 work s':>15} {'finalize s':>11} "
          f"{'write_outputs s':>16} {'RSS growth MB':>14}")
    for n in segments:
        run = copy_trained(trained, Path(tmp), f"seg{n}")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t = reduce_cost(run, n, test_grad, repeats)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        ratio = t["sequential chain"] / t["scan path"] if t["scan path"] > 0 else float("nan")
        print(f"{n:>8} {t['embed']:>8.2f} {t['vector chain']:>15.4f} {t['sequential chain']:>19.3f} "
              f"{t['scan rounds']:>12} {t['scan work']:>12.3f} {t['scan path']:>12.3f} {ratio:>9.2f} "
              f"{t['width 2 work']:>15.3f} {t['finalize']:>11.2f} {t['write_outputs']:>16.3f} {grown / 1e6:>14.0f}", flush=True)
        shutil.rmtree(run.uri)
    print("\n(scan path: the slowest scan_link plus each round's slowest combine, the scan's wall time with "
          "one CPU per actor;\n RSS growth: how far this process's peak RSS rose during that count's embed and "
          "reduce; 0 = it stayed below an earlier peak)")


if __name__ == "__main__":
    sys.exit(main())
