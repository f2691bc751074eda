"""The `rayattr` command: answers from finished runs, and plans for new ones.

    rayattr runs [STORE]
    rayattr show RUN [--format json]
    rayattr values RUN [--by-phase | --by-layer | --exact] [--format table|csv|json]
    rayattr query RUN --text "def parse(s):" [--k 5] [--all] [--each] [--source NAME] [--by-source] [--format csv|json]
    rayattr report RUN [--out report/]
    rayattr gc RUN [--dry-run]
    rayattr exact RUN [--every K] [--hold kappa v]   (exact first-order values of a small run)
    rayattr validate RUN --subsets 16 --fraction 0.1 --sources [--occurrences 16 [--weight 1 0.01]] [--smoothness]
    rayattr plan jobs/configs/llama7b_1t.yaml [--tokens 1T]
    rayattr train [CONFIG] [--store DIR] [--ranks N] ...   (the built-in job: train, record, attribute)
    rayattr attribute RUN [--segments N] [--cpu] [--wait SECONDS]  (values for a run recorded by rayattr.Recorder)

RUN is a run id in the store ($RAYATTR_STORE, else ./rayattr_runs), e.g. run-20261124-101500,
or the run's path or URI (<store>/<run_id>, s3://bucket/prefix/<run_id>). S3 runs take their
endpoint and credentials from the AWS environment, or from
`--storage-option endpoint_url=http://...` (repeatable; s3fs keyword arguments).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
import time
import traceback
from typing import Any, Sequence

from rayattr.errors import BUG_EXIT, USER_ERROR_EXIT, RayattrError, UsageError, error_line

FORMATS = ("table", "csv", "json")


def format_rows(rows: list[dict[str, Any]], columns: Sequence[str], fmt: str) -> str:
    """Rows as an aligned text table, CSV or a JSON list."""
    if fmt == "json":
        return json.dumps([{c: r.get(c) for c in columns} for r in rows], indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue().rstrip("\n")

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        text = "" if v is None else str(v)
        text = text.replace("\n", " ")
        return text if len(text) <= 70 else text[:67] + "..."

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _storage_options(pairs: list[str] | None) -> dict[str, Any]:
    """--storage-option KEY=VALUE pairs as fsspec keyword arguments, each value typed
    (rayattr.store.options.parse_option_value: anon=false is False, not the string)."""
    from rayattr.store.options import parse_option_value

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--storage-option wants KEY=VALUE, got {pair!r}")
        out[key] = parse_option_value(key, value)
    return out


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seconds(text: str) -> float:
    """argparse type: a number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text}")
    return value


def cmd_runs(args) -> int:
    from rayattr.store import StoreOptions, default_store, list_runs

    store = args.store or default_store()
    runs = list_runs(store, StoreOptions(storage_options=_storage_options(args.storage_option)))
    if not runs:
        print(f"no runs under {store}", file=sys.stderr)
        return 0
    cols = ["run_id", "status", "model", "num_steps", "n_train", "n_sources", "created"]
    if any(r.get("error") for r in runs):  # why a run failed or cannot be read
        cols.append("error")
    rows = [{**r, "model": r.get("model_family", "-")} for r in runs]
    print(format_rows(rows, cols, args.format))
    return 0


def _open(args):
    from rayattr.query.finished import open_run

    return open_run(args.run, _storage_options(args.storage_option))


def cmd_values(args) -> int:
    run = _open(args)
    if args.by_phase:
        table = run.phases().sort_by([("source", "ascending"), ("phase", "ascending")])
    elif args.by_layer:
        table = run.layers().sort_by([("source", "ascending"), ("layer", "ascending")])
    elif args.exact:
        table = run.exact_sources()
    else:
        table = run.sources()
    # the text table leaves out a value_se no source has (one member: capture.members); JSON and
    # CSV keep every column of the stored table
    cols = [c for c in table.column_names
            if args.format != "table" or c != "value_se" or table[c].null_count < len(table)]
    print(format_rows(table.to_pylist(), cols, args.format))
    return 0


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


SAMPLE_COLUMNS = ("sample_id", "source", "step", "score", "se", "within_noise", "text")


def _samples(rows: list[dict]) -> list[dict]:
    return [{c: r.get(c) for c in SAMPLE_COLUMNS} for r in rows]


def _query_json(meta: dict, results: list, each: bool) -> dict:
    """The run, the queries (text and sha256), k and the projection, then the answer(s)."""
    def body(res) -> dict:
        out = {"helpful": _samples(res.helpful), "harmful": _samples(res.harmful)}
        if res.sources is not None:
            out["sources"] = res.sources
        if res.notices:
            out["notes"] = res.notices
        return out

    if each:
        return {**meta, "answers": [{"query": i, "sha256": q["sha256"], **body(r)}
                                    for i, (q, r) in enumerate(zip(meta["queries"], results))]}
    return {**meta, **body(results[0])}


def _query_csv(results: list, each: bool) -> str:
    """One tidy table: a row per listed sample (list helpful/harmful) and, with --by-source,
    per source (list source); `query` is the text's index, or "all" for texts scored together."""
    rows = []
    for i, res in enumerate(results):
        for key in ("helpful", "harmful"):
            rows += [{"query": i if each else "all", "list": key, "rank": n, **r}
                     for n, r in enumerate(_samples(getattr(res, key)), 1)]
        for n, r in enumerate(res.sources or [], 1):
            rows.append({"query": i if each else "all", "list": "source", "rank": n,
                         "source": r["source"], "score": r["score"]})
    return format_rows(rows, ["query", "list", "rank", *SAMPLE_COLUMNS], "csv")


def _short(text: str, n: int = 70) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= n else text[:n - 3] + "..."


def _ranked_list(rows: list[dict], what: str, show_all: bool) -> str:
    """One ranked list for the terminal: the rows clear of noise first (ranked by score), those
    within noise after them with --all, and a line saying how many are which."""
    from rayattr.report.standing import noise_sentence, split_by_noise

    clear, within = split_by_noise(rows)
    shown = clear + within if show_all else clear
    text = f"{what} ({len(rows)}): {noise_sentence(len(clear), len(within), 'samples', hidden=not show_all)}"
    cols = [c for c in SAMPLE_COLUMNS if c != "within_noise" or show_all]
    return text + (f"\n{format_rows(shown, cols, 'table')}" if shown else "")


def _query_table(res, show_all: bool = False) -> str:
    text = (_ranked_list(res.helpful, "most helpful", show_all) + "\n\n"
            + _ranked_list(res.harmful, "most harmful", show_all))
    if res.sources is not None:
        text += f"\n\nsources:\n{format_rows(res.sources, list(res.sources[0]) if res.sources else [], 'table')}"
    return text


def cmd_query(args) -> int:
    from rayattr.query import read_query_file
    from rayattr.query.texts import check_encodable

    texts = list(args.text or [])
    for i, text in enumerate(texts):  # undecodable argv bytes arrive as lone surrogates
        check_encodable(text, f"query {i} (--text number {i + 1})")
    if args.file:
        texts += read_query_file(args.file)
    if not texts:
        raise UsageError("give the query as --text TEXT (repeatable) or --file queries.jsonl")
    t0 = time.perf_counter()
    say = (lambda msg: None) if args.quiet else \
        (lambda msg: print(f"[{time.perf_counter() - t0:5.1f}s] {msg}", file=sys.stderr, flush=True))
    run = _open(args)
    say(f"run {run.run.run_id}: loading torch")  # the first few seconds of every query
    result = run.query(texts, k=args.k, by_source=args.by_source, each=args.each,
                       sources=args.source, progress=say)
    results = result if args.each else [result]
    say("done")
    notes = [(i, n) for i, r in enumerate(results) for n in r.notices]
    for _, notice in notes:
        print(f"note: {notice}", file=sys.stderr)
    proj = run.manifest.get("projection") or {}
    meta = {"run_id": run.run.run_id, "run_uri": run.uri, "k": args.k, "projection_rank": proj.get("rank"),
            "projection": proj, "scored": "each" if args.each else "together", "source_filter": args.source,
            "queries": [{"index": i, "sha256": _sha256(t), "text": t} for i, t in enumerate(texts)]}
    if args.format == "json":
        print(json.dumps(_query_json(meta, results, args.each), indent=1))
    elif args.format == "csv":
        print(_query_csv(results, args.each))
    elif args.each:
        print("\n\n".join(f"query {i}: {_short(t)}\n{_query_table(r, args.all)}"
                           for i, (t, r) in enumerate(zip(texts, results))))
    else:
        print(_query_table(result, args.all))
    return 0


def cmd_report(args) -> int:
    try:
        path = _open(args).report(args.out, k=args.k)
    except OSError as e:  # the output directory: the user's to fix
        where = f": {e.filename}" if getattr(e, "filename", None) else f": {args.out}"
        raise UsageError(f"cannot write the report ({e.strerror or e}){where}") from None
    print(f"report: {path}")
    return 0


def fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {value}")
    return value


def smoothness_steps(text: str) -> tuple[float, ...]:
    from rayattr.validate.smoothness import parse_steps
    from rayattr.validate import ValidationError

    try:
        return parse_steps(text)
    except ValidationError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--smoothness-steps: ")) from None


def cmd_validate(args) -> int:
    from rayattr.validate import validate_run
    from rayattr.validate.validation import dumps, format_summary

    so = _storage_options(args.storage_option)
    smooth = args.smoothness or args.smoothness_steps is not None
    if not (args.subsets or args.sources is not None or args.occurrences or smooth):
        args.subsets, args.sources = 16, []  # a default that fits the built-in run in minutes
    result = validate_run(args.run, subsets=args.subsets, fraction=args.fraction,
                          sources=(args.sources or True) if args.sources is not None else False,
                          occurrences=args.occurrences, seed=args.seed, gangs=args.gangs,
                          storage_options=so, progress=not args.no_progress, eps=tuple(args.weight),
                          window=args.window, smoothness=smooth, smoothness_steps=args.smoothness_steps)
    if args.format == "json":
        print(dumps(result.summary))
    else:  # the verdict stays the last line: where it went and what shows it come first
        print(f"validation of {result.uri}, written to {result.uri}/validation/; `rayattr show {args.run}` and "
              f"`rayattr report {args.run}` (re-run it to update a report already written) show it\n"
              f"{format_summary(result.summary)}")
    return 0


def cmd_exact(args) -> int:
    from rayattr.exact.run import format_exact, run_exact

    uri, summary = run_exact(args.run, _storage_options(args.storage_option), every=args.every,
                             freeze=frozenset(args.hold or ()), progress=not args.no_progress,
                             anchor=not args.no_anchor)
    print(json.dumps(summary, indent=1) if args.format == "json" else format_exact(uri, summary))
    return 0


def cmd_show(args) -> int:
    from rayattr.store import StoreOptions, open_run_ref
    from rayattr.report.summary import format_summary, run_summary

    run = open_run_ref(args.run, StoreOptions(storage_options=_storage_options(args.storage_option)))
    summary = run_summary(run)
    print(json.dumps(summary, indent=1) if args.format == "json" else format_summary(summary))
    return 0


def cmd_attribute(args) -> int:
    from rayattr.pipeline.attribution import attribute

    result = attribute(args.run, segments=args.segments, cpu=args.cpu, wait_s=args.wait,
                       storage_options=_storage_options(args.storage_option), progress=not args.no_progress)
    rows = result.sources
    print(format_rows(rows, ["source", "n_samples", "n_occurrences", "value", "value_per_sample"], "table"))
    print(f"\nsteps: {result.num_steps}, segments: {result.segments}")
    print(f"run: {result.uri}")
    return 0


def cmd_gc(args) -> int:
    from rayattr.store import StoreOptions, open_run_ref
    from rayattr.store.gc import check_collectable, collect, collectable
    from rayattr.report.units import human_bytes

    run = open_run_ref(args.run, StoreOptions(storage_options=_storage_options(args.storage_option)),
                       mode="read" if args.dry_run else "record")
    check_collectable(run)
    garbage = collectable(run)
    if not garbage:
        print(f"nothing to delete in {run.uri}")
        return 0
    rows = [{"what": g.group, "objects": len(g.objects), "size": human_bytes(g.bytes)} for g in garbage]
    total = sum(g.bytes for g in garbage)
    rows.append({"what": "total", "objects": sum(len(g.objects) for g in garbage), "size": human_bytes(total)})
    print(format_rows(rows, ["what", "objects", "size"], "table"))
    if args.dry_run:
        print(f"\ndry run: would delete the above from {run.uri}; values, embeddings, weights, data, "
              "step records and run.json stay")
        return 0
    collect(run, garbage)
    print(f"\ndeleted {human_bytes(total)} of intermediates from {run.uri}")
    return 0


RUN_HELP = "run id in the store ($RAYATTR_STORE, else ./rayattr_runs), or the run's path or URI"


def parser() -> argparse.ArgumentParser:
    from rayattr import __version__

    p = argparse.ArgumentParser(prog="rayattr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    so = argparse.ArgumentParser(add_help=False)
    so.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                    help="fsspec/s3fs option for the store, e.g. endpoint_url=http://127.0.0.1:8333")

    r = sub.add_parser("runs", parents=[so], help="runs under a store root, with status, model, steps, samples")
    r.add_argument("store", nargs="?", help="store root: local path or s3://bucket/prefix "
                                            "(default $RAYATTR_STORE, else ./rayattr_runs)")
    r.add_argument("--format", choices=FORMATS, default="table")
    r.set_defaults(func=cmd_runs)

    sh = sub.add_parser("show", parents=[so], help="one run: status, config, stage timings, counts, training loss")
    sh.add_argument("run", help=RUN_HELP)
    sh.add_argument("--format", choices=("table", "json"), default="table")
    sh.set_defaults(func=cmd_show)

    v = sub.add_parser("values", parents=[so], help="per-source value table (or source x phase)")
    v.add_argument("run", help=RUN_HELP)
    how = v.add_mutually_exclusive_group()
    how.add_argument("--by-phase", action="store_true", help="source x training phase")
    how.add_argument("--by-layer", action="store_true", help="source x layer")
    how.add_argument("--exact", action="store_true", help="per source from the exact first-order values "
                                                          "(after `rayattr exact RUN`)")
    v.add_argument("--format", choices=FORMATS, default="table")
    v.set_defaults(func=cmd_values)

    q = sub.add_parser("query", parents=[so], help="most helpful and harmful training samples for new text")
    q.add_argument("run", help=RUN_HELP)
    q.add_argument("--text", action="append", help="query text (repeatable: scored together as one test set)")
    q.add_argument("--file", help="queries: .jsonl with a 'text' field per line, or one text per line")
    q.add_argument("--k", type=positive_int, default=10, help="rows per list (default 10)")
    q.add_argument("--each", action="store_true", help="one answer per text instead of one for all together")
    q.add_argument("--source", action="append", metavar="NAME",
                   help="rank only training samples of this source (repeatable)")
    q.add_argument("--by-source", action="store_true", help="also rank the data sources for this query")
    q.add_argument("--all", action="store_true", help="also list the samples within noise (|score| < 2 SE) "
                   "after those clear of it; csv and json always hold every row")
    q.add_argument("--format", choices=FORMATS, default="table")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    q.set_defaults(func=cmd_query)

    rp = sub.add_parser("report", parents=[so], help="report.html with figures, top/bottom samples, config")
    rp.add_argument("run", help=RUN_HELP)
    rp.add_argument("--out", default="report", help="output directory (default ./report)")
    rp.add_argument("--k", type=positive_int, default=10, help="samples in the top and bottom lists")
    rp.set_defaults(func=cmd_report)

    va = sub.add_parser("validate", parents=[so], help="retrain counterfactually and check the values "
                                                       "predict it (LDS, source and occurrence Spearman)")
    va.add_argument("run", help=RUN_HELP)
    va.add_argument("--subsets", type=int, default=0, metavar="N",
                    help="N random subsets of training samples, all their occurrences removed")
    va.add_argument("--fraction", type=fraction, default=0.1, help="share of samples per subset (default 0.1)")
    va.add_argument("--sources", nargs="*", metavar="SOURCE",
                    help="leave one source out: every source, or the ones named")
    va.add_argument("--occurrences", type=int, default=0, metavar="N", help="N single occurrences removed")
    va.add_argument("--weight", type=float, nargs="+", default=[1.0], metavar="EPS",
                    help="with --occurrences: retrain each occurrence at loss weight 1 - EPS for every EPS given "
                         "(1 removes it); e.g. --weight 1 0.01 judges linearity and compares the values with "
                         "the first-order response Δloss/EPS at the smallest EPS")
    va.add_argument("--window", metavar="A:B",
                    help="only occurrences at steps [A, B) are removed and predicted (either side may be "
                         "empty, e.g. 144: for the last quarter of a 192-step run)")
    va.add_argument("--smoothness", action="store_true",
                    help="the attributability check: retrain at loss weights 1 + h·w and 1 + 2h·w along a random "
                         "±1 direction w over the occurrences (4 retrains at the default h), and say whether the "
                         "run's final loss responds linearly to its data (docs/method.md §6)")
    va.add_argument("--smoothness-steps", type=smoothness_steps, metavar="H1,H2",
                    help="the step sizes h of --smoothness (implies it), each in (0, 0.5]; default 0.1,0.01")
    va.add_argument("--seed", type=int, default=0,
                    help="seed of the subsets and occurrences drawn, and of --smoothness's direction")
    va.add_argument("--gangs", type=positive_int, help="retraining gangs at once (default: as many as fit)")
    va.add_argument("--format", choices=("table", "json"), default="table")
    va.add_argument("--no-progress", action="store_true")
    va.set_defaults(func=cmd_validate)

    ex = sub.add_parser("exact", parents=[so], help="exact first-order values of a small run: its trajectory "
                                                    "replayed in float64 and differentiated, and how the values agree")
    ex.add_argument("run", help=RUN_HELP)
    ex.add_argument("--every", type=positive_int, metavar="K",
                    help="steps between the replay's checkpoints (default ⌈√steps⌉: memory grows as √steps)")
    ex.add_argument("--hold", nargs="+", choices=("kappa", "v"),
                    help="hold the clip factor and/or Adam's second moment at the run's values")
    ex.add_argument("--no-anchor", action="store_true",
                    help="replay from the initial weights only, ignoring the states the run kept (train.states_every)")
    ex.add_argument("--format", choices=("table", "json"), default="table")
    ex.add_argument("--no-progress", action="store_true")
    ex.set_defaults(func=cmd_exact)

    g = sub.add_parser("gc", parents=[so], help="delete a finished run's intermediates (gradient shards, "
                                                "checkpoints); answers stay")
    g.add_argument("run", help=RUN_HELP)
    g.add_argument("--dry-run", action="store_true", help="list what would be deleted, with sizes")
    g.set_defaults(func=cmd_gc)

    at = sub.add_parser("attribute", parents=[so], help="embed and reduce a recorded run (rayattr.Recorder, "
                                                        "the HF callback): writes its values/")
    at.add_argument("run", help=RUN_HELP)
    at.add_argument("--segments", type=positive_int, help="influence-checkpoint segments (default: one per CPU/GPU)")
    at.add_argument("--cpu", action="store_true", help="segment actors on CPUs, whatever the training used")
    at.add_argument("--wait", type=seconds, default=0.0, metavar="SECONDS",
                    help="wait up to SECONDS for writers of the recording that are still open "
                         "(default 0: a run with open writers is refused, naming them)")
    at.add_argument("--no-progress", action="store_true")
    at.set_defaults(func=cmd_attribute)

    sub.add_parser("train", add_help=False, help="the built-in job: pretrain, record and attribute "
                                                 "(rayattr train --help)")
    sub.add_parser("plan", add_help=False, help="storage, memory and time estimates for a config "
                                                "(rayattr plan --help)")
    return p


def _run(args) -> int:
    """One command: a RayattrError prints as one line and exits 2; anything else is a bug,
    printed with its traceback, exit 1."""
    try:
        return args.func(args)
    except BrokenPipeError:
        raise
    except RayattrError as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return USER_ERROR_EXIT
    except Exception:
        traceback.print_exc()
        print("error: this is a bug in rayattr (the traceback above); please report it", file=sys.stderr)
        return BUG_EXIT


SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a Unix tool whose reader went away


def main(argv: list[str] | None = None) -> int:
    from rayattr.runtime.logs import show_warnings

    show_warnings()  # the library's warnings (a divergence, a restart), once each on stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a bare `rayattr`: what it can do, not a usage error
        parser().print_help()
        return 2
    try:
        if argv and argv[0] == "plan":
            from rayattr.plan.estimate import plan_main

            return plan_main(argv[1:])
        if argv and argv[0] == "train":
            from rayattr.pipeline.job import main as train_main

            return train_main(argv[1:], prog="rayattr train")
        code = _run(parser().parse_args(argv))
        sys.stdout.flush()  # a reader that left early (`| head`) shows up here, not at exit
        return code
    except BrokenPipeError:
        # Quiet, like Unix tools: point stdout at /dev/null so the interpreter's own flush at
        # exit does not raise again.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            pass  # stdout is not a real file (in-process callers)
        return SIGPIPE_EXIT


if __name__ == "__main__":
    sys.exit(main())
