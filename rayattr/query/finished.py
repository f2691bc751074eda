"""The Python face of a finished run, mirroring the `rayattr` command line.

    import rayattr
    run = rayattr.open_run("./rayattr_runs/run-20261124-101500")   # or s3://bucket/runs/<id>
    run.sources()                     # per-source values (pyarrow Table), best first
    run.values()                      # one row per training occurrence
    run.phases()                      # source x training phase
    run.query(["some new text"], k=5) # most helpful / harmful training samples for it
    run.report("report/")             # report.html + PNGs
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pyarrow as pa

from rayattr.query.runs import require_finished
from rayattr.query.errors import QueryError
from rayattr.store import Run, StoreOptions, open_run_ref
from rayattr.store.layout import EXACT_SOURCES, LAYER_VALUES, PHASE_VALUES, SAMPLE_VALUES, SOURCE_VALUES

if TYPE_CHECKING:  # scoring needs torch: imported by query() only, so tables open fast
    from rayattr.query.answer import QueryResult


class FinishedRun:
    """Read-only answers of one finished run; nothing here recomputes embeddings."""

    def __init__(self, run: Run):
        self.run = run

    @property
    def uri(self) -> str:
        return self.run.uri

    @property
    def manifest(self) -> dict:
        return self.run.manifest

    def values(self) -> pa.Table:
        """values/samples.parquet: sample_id, source, step, epoch, value per occurrence."""
        return self.run.read_table(SAMPLE_VALUES)

    def sources(self) -> pa.Table:
        """values/sources.parquet: source, n_samples, n_occurrences, value with its 95 % interval
        (value_low, value_high) and, with capture.members, its standard error (value_se), value_per_sample."""
        return self.run.read_table(SOURCE_VALUES)

    def exact_sources(self) -> pa.Table:
        """exact/sources.parquet (`rayattr exact`): the same columns, from the exact first-order values."""
        if not self.run.exists(EXACT_SOURCES):
            raise QueryError(f"run {self.run.run_id} has no exact values: `rayattr exact {self.run.run_id}` computes "
                             "them (small runs: docs/method.md §10)")
        return self.run.read_table(EXACT_SOURCES)

    def phases(self) -> pa.Table:
        """values/phases.parquet: source, phase, step_start, step_end, n_occurrences, value."""
        return self.run.read_table(PHASE_VALUES)

    def layers(self) -> pa.Table:
        """values/layers.parquet: source, layer, value (each layer's part of the source's value)."""
        return self.run.read_table(LAYER_VALUES)

    def query(self, texts: str | list[str], k: int = 10, by_source: bool = False,
              each: bool = False, sources: list[str] | None = None,
              progress: Callable[[str], None] | None = None) -> QueryResult | list[QueryResult]:
        """Most helpful and harmful training samples for `texts` (one test set, or each=True
        for one answer per text), scored against the stored final embeddings; `sources`
        limits the ranked samples to those sources."""
        from rayattr.query.answer import query_run

        return query_run(self.run, [texts] if isinstance(texts, str) else list(texts), k=k,
                         each=each, by_source=by_source, sources=sources, progress=progress)

    def report(self, out_dir: str | Path = "report", k: int = 10) -> Path:
        """Write report.html and its PNGs into out_dir; returns report.html's path."""
        from rayattr.report.html import write_report

        return write_report(self.run, out_dir, k=k)

    def __repr__(self) -> str:
        return f"FinishedRun({self.uri!r})"


def open_run(uri: str, storage_options: dict | None = None) -> FinishedRun:
    """rayattr.open_run, the Python face of a finished run: a run id in the default store
    ($RAYATTR_STORE, else ./rayattr_runs) or its URI (local path, file:// or s3://), opened
    read-only (store/names.open_run_ref). Clear errors for an unknown run (StoreError, listing the
    runs that exist) and for one that has not finished (RunNotFinished)."""
    options = StoreOptions(storage_options=dict(storage_options or {}))
    return FinishedRun(require_finished(open_run_ref(str(uri), options=options, mode="read")))
