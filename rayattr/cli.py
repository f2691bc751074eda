"""The `rayattr` command: answers from finished runs, and plans for new ones.

    rayattr runs ./rayattr_runs
    rayattr values ./rayattr_runs/run-001 [--by-phase] [--format table|csv|json]
    rayattr query ./rayattr_runs/run-001 --text "def parse(s):" [--k 5] [--by-source] [--format json]
    rayattr report ./rayattr_runs/run-001 [--out report/]
    rayattr plan jobs/configs/llama7b_1t.yaml [--tokens 1T]

S3 runs take their endpoint and credentials from the AWS environment, or from
`--storage-option endpoint_url=http://...` (repeatable; s3fs keyword arguments).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from typing import Any, Sequence

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
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--storage-option wants KEY=VALUE, got {pair!r}")
        out[key] = value
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


def cmd_runs(args) -> int:
    from rayattr.store import StoreOptions, list_runs

    runs = list_runs(args.store, StoreOptions(storage_options=_storage_options(args.storage_option)))
    if not runs:
        print(f"no runs under {args.store}", file=sys.stderr)
        return 0
    cols = ["run_id", "status", "model", "num_steps", "n_train", "n_sources", "created"]
    if any(r.get("error") for r in runs):  # why a run failed or cannot be read
        cols.append("error")
    rows = [{**r, "model": r.get("model_family", "-")} for r in runs]
    print(format_rows(rows, cols, args.format))
    return 0


def _open(args):
    from rayattr.api import open_run

    return open_run(args.run, _storage_options(args.storage_option))


def cmd_values(args) -> int:
    run = _open(args)
    table = run.phases() if args.by_phase else run.sources()
    if args.by_phase:
        table = table.sort_by([("source", "ascending"), ("phase", "ascending")])
    print(format_rows(table.to_pylist(), table.column_names, args.format))
    return 0


def cmd_query(args) -> int:
    from rayattr.query import read_query_file

    texts = list(args.text or [])
    if args.file:
        texts += read_query_file(args.file)
    if not texts:
        raise ValueError("give the query as --text TEXT (repeatable) or --file queries.jsonl")
    result = _open(args).query(texts, k=args.k, by_source=args.by_source)
    for notice in result.notices:
        print(f"note: {notice}", file=sys.stderr)
    if args.format == "json":
        out = {key: [{c: r.get(c) for c in ("sample_id", "source", "step", "score", "text")}
                     for r in getattr(result, key)] for key in ("helpful", "harmful")}
        if result.sources is not None:
            out["sources"] = result.sources
        print(json.dumps(out, indent=1))
        return 0
    cols = ["sample_id", "source", "step", "score", "text"]
    print(f"most helpful ({len(result.helpful)}):\n{format_rows(result.helpful, cols, 'table')}\n")
    print(f"most harmful ({len(result.harmful)}):\n{format_rows(result.harmful, cols, 'table')}")
    if result.sources is not None:
        print(f"\nsources:\n{format_rows(result.sources, list(result.sources[0]) if result.sources else [], 'table')}")
    return 0


def cmd_report(args) -> int:
    path = _open(args).report(args.out, k=args.k)
    print(f"report: {path}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayattr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    so = argparse.ArgumentParser(add_help=False)
    so.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                    help="fsspec/s3fs option for the store, e.g. endpoint_url=http://127.0.0.1:8333")

    r = sub.add_parser("runs", parents=[so], help="runs under a store root, with status, model, steps, samples")
    r.add_argument("store", help="store root: local path or s3://bucket/prefix")
    r.add_argument("--format", choices=FORMATS, default="table")
    r.set_defaults(func=cmd_runs)

    v = sub.add_parser("values", parents=[so], help="per-source value table (or source x phase)")
    v.add_argument("run", help="run URI: <store>/<run_id>")
    v.add_argument("--by-phase", action="store_true", help="source x training phase")
    v.add_argument("--format", choices=FORMATS, default="table")
    v.set_defaults(func=cmd_values)

    q = sub.add_parser("query", parents=[so], help="most helpful and harmful training samples for new text")
    q.add_argument("run", help="run URI: <store>/<run_id>")
    q.add_argument("--text", action="append", help="query text (repeatable: scored together as one test set)")
    q.add_argument("--file", help="queries: .jsonl with a 'text' field per line, or one text per line")
    q.add_argument("--k", type=positive_int, default=10, help="rows per list (default 10)")
    q.add_argument("--by-source", action="store_true", help="also rank the data sources for this query")
    q.add_argument("--format", choices=("table", "json"), default="table")
    q.set_defaults(func=cmd_query)

    rp = sub.add_parser("report", parents=[so], help="report.html with figures, top/bottom samples, config")
    rp.add_argument("run", help="run URI: <store>/<run_id>")
    rp.add_argument("--out", default="report", help="output directory (default ./report)")
    rp.add_argument("--k", type=positive_int, default=10, help="samples in the top and bottom lists")
    rp.set_defaults(func=cmd_report)

    sub.add_parser("plan", add_help=False, help="storage, memory and time estimates for a config "
                                                "(rayattr plan --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plan":
        from rayattr.plan import plan_main

        return plan_main(argv[1:])
    args = parser().parse_args(argv)
    from rayattr.config import ConfigError
    from rayattr.data import DataError
    from rayattr.query import QueryError
    from rayattr.store import StoreError

    try:
        return args.func(args)
    except (QueryError, StoreError, DataError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a report directory that cannot be written
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
