"""The built-in job: pretrain with DeepSpeed under Ray while recording, then value every sample.

    rayattr train [CONFIG] [--store DIR] [--ranks N] ...     # installed with the package
    python jobs/pretrain_attr.py [--config CONFIG] ...       # the `ray job submit` entry point

With RAY_ADDRESS set (as `ray job submit` does) it joins that cluster; otherwise it starts a
Ray instance of its own on this machine, even when `ray start` left a cluster running.
"""

from __future__ import annotations

import argparse
import os
import sys

from rayattr.config import Config, load_config
from rayattr.errors import USER_ERROR_EXIT, RayattrError, error_line
from rayattr.runtime.logs import show_warnings
from rayattr.optim.spec import resolve_optimizer
from rayattr.store.names import STORE_ENV


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config_file", nargs="?", metavar="CONFIG", help="YAML config (same as --config)")
    p.add_argument("--config", help="YAML config (see jobs/configs/default.yaml); defaults: built-in demo")
    p.add_argument("--store", help="store root URI (local path or s3://bucket/prefix); default: $RAYATTR_STORE, "
                   "else the config's store.uri (./rayattr_runs)")
    p.add_argument("--run-id", help="run name under the store root")
    p.add_argument("--ranks", type=int, help="DeepSpeed ranks (Ray actors)")
    p.add_argument("--segments", type=int, help="influence-checkpoint segments (segment actors)")
    p.add_argument("--steps", type=int, help="stop training after this many optimizer steps")
    p.add_argument("--epochs", type=int, help="passes over the training data")
    p.add_argument("--placement", choices=["PACK", "SPREAD", "STRICT_SPREAD"],
                   help="rank actors' placement group strategy (STRICT_SPREAD: one rank per node)")
    p.add_argument("--gpu", action="store_true", default=None, help="one GPU per rank (NCCL)")
    p.add_argument("--resume", metavar="RUN", help="finish a partial run (its id under --store, or its URI) "
                   "with its recorded config; --config/overrides must agree with it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.config_file and args.config and args.config_file != args.config:
        p.error(f"two configs given: {args.config_file} and --config {args.config}")
    args.config = args.config or args.config_file
    return args


def command_line_settings(args: argparse.Namespace) -> dict:
    """The config keys the command line sets (None: not given)."""
    return {"train.ranks": args.ranks, "embed.segments": args.segments, "train.steps": args.steps,
            "train.epochs": args.epochs, "train.use_gpu": args.gpu}


def resolve_config(args: argparse.Namespace) -> tuple[Config, str | None]:
    """The config to run: the file (or built-in defaults) with the command line's settings, and
    the store root from --store, else $RAYATTR_STORE, else the config's store.uri. The
    environment comes before the file so that a run the job writes is where `rayattr` looks up
    run ids (rayattr.store.default_store). Returns it and, when $RAYATTR_STORE replaced a store
    the config file names, a note saying so."""
    where = {"run_id": args.run_id, "train.placement": args.placement}
    cfg = load_config(args.config, **command_line_settings(args), **where)
    env = os.environ.get(STORE_ENV)
    store = args.store or env or cfg.store.uri
    note = None
    if store != cfg.store.uri:
        if not args.store and args.config:
            note = (f"note: store {store} from ${STORE_ENV}, not {cfg.store.uri} from {args.config} "
                    "(--store overrides both)")
        cfg = cfg.with_overrides(**{"store.uri": store}).validate()
    resolve_optimizer(cfg)  # the optimizer and the capture that goes with it, checked with the rest
    return cfg, note


def main(argv=None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    from rayattr.pipeline.stages import complete_run, open_for_resume, start_run

    show_warnings()  # the library's warnings, and where Ray runs, on stderr

    try:
        cfg, note = resolve_config(args)
        if note:
            print(note, file=sys.stderr, flush=True)
        if args.resume:
            # compare with the recorded config only what the user actually asked for
            given = cfg if args.config or any(v is not None for v in command_line_settings(args).values()) else None
            cfg, run = open_for_resume(args.resume, given, store=cfg.store.uri,
                                       storage_options=cfg.store.storage_options)
            print(f"resuming {run.uri} (status {run.manifest.get('status')})", flush=True)
        else:
            run = start_run(cfg, connect_ray=True)  # the store is checked before Ray starts, the data before the run exists
    except RayattrError as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return USER_ERROR_EXIT

    import ray

    from rayattr.runtime.cluster import connect

    started = not ray.is_initialized()
    if started:
        connect()
    try:
        result = complete_run(cfg, run, progress=not args.no_progress)
    except RayattrError as e:  # a NaN loss, a divergence, a store fault: committed data stays
        print(f"error: {error_line(e)}", file=sys.stderr)
        return USER_ERROR_EXIT
    if started:  # Ray's forwarded worker lines end here, not after the summary
        ray.shutdown()

    m = run.reload_manifest()
    if m.get("n_truncated"):  # truncation is by design (as in training), but never silent
        used = (m.get("data") or {}).get("n_used", m.get("n_train"))  # only trained-on rows are tokenised
        print(f"note: {m['n_truncated']} of the {used} training texts the run trains on are longer than data.seq_len = "
              f"{cfg.data.seq_len} tokens and were truncated to it (run.json: n_truncated)")
    print(job_summary(result, run_ref(cfg.store.uri, run.run_id, result.uri)), flush=True)
    return 0


def run_ref(store: str, run_id: str, uri: str) -> str:
    """How `rayattr` commands name the run: its id where they look it up by default
    ($RAYATTR_STORE, else ./rayattr_runs), else its URI."""
    from rayattr.store.names import default_store

    same = os.path.abspath(store) == os.path.abspath(default_store()) if "://" not in store else store == default_store()
    return run_id if same else uri


def job_summary(result, run_id: str) -> str:
    """The job's last words: where the run is, how long it took, each source's value per sample
    with its 95 % interval, which sources stand apart, and the commands that answer questions."""
    from rayattr.report.standing import per_sample_interval, standing_sentence

    lines = [f"\nrun: {result.uri}", f"steps: {result.num_steps}, segments: {result.segments}",
             "stage wall times: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()), "",
             f"{'source':<14}{'samples':>8}{'value/sample':>14}   95% interval (per sample)"]
    for r in result.sources:
        ci = per_sample_interval(r)
        span = f"[{ci[0]:.2e}, {ci[1]:.2e}]" if ci else "-"
        lines.append(f"{r['source']:<14}{r['n_samples']:>8}{r['value_per_sample']:>14.3e}   {span}")
    if result.sources:
        lines += ["", standing_sentence(result.sources)]
    lines += ["", f"next: rayattr values {run_id} | rayattr query {run_id} --text \"...\" | "
                  f"rayattr validate {run_id} | rayattr report {run_id}"]
    return "\n".join(lines)

