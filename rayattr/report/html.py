"""report.html: one self-contained page (figures inlined as base64) with the PNGs beside it."""

from __future__ import annotations

import base64
import datetime as dt
import html
from pathlib import Path

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from rayattr.report import figures
from rayattr.report.trust import separated_sources, trust_box, trust_section  # noqa: F401 (re-exported)
from rayattr.report.standing import noise_sentence, split_by_noise
from rayattr.store import Run
from rayattr.report.summary import loss_summary
from rayattr.report.limits import MEDIAN_CAP, SCAN_ROWS
from rayattr.store.layout import PHASE_VALUES, SAMPLE_VALUES, SOURCE_VALUES, VALIDATION_DATA


def sample_totals(samples: pa.Table) -> list[dict]:
    """Each training sample's value summed over its occurrences, with source and the
    projection's standard error (occurrences' errors added in quadrature), best first."""
    samples = samples.append_column("se2", pc.multiply(samples["value_se"], samples["value_se"]))
    g = samples.group_by(["sample_id", "source"]).aggregate([("value", "sum"), ("step", "count"), ("se2", "sum")])
    g = g.rename_columns(["sample_id", "source", "value", "n_occurrences", "se2"]).sort_by([("value", "descending")])
    rows = g.to_pylist()
    for r in rows:
        se2 = r.pop("se2")
        r["se"] = se2 ** 0.5 if se2 is not None and se2 == se2 else None
        r["noise"] = "" if r["se"] is None else ("within noise" if abs(r["value"]) < 2 * r["se"] else "")
    return rows


_TOTALS = [("value", "sum"), ("n_occurrences", "sum"), ("se2", "sum")]


def scan_samples(run: Run, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """values/samples.parquet in record batches of SCAN_ROWS, never the whole table."""
    with run.open_read(SAMPLE_VALUES) as f:
        pf = pq.ParquetFile(f)
        cols = None if columns is None else [c for c in columns if c in pf.schema_arrow.names]
        yield from pf.iter_batches(batch_size=SCAN_ROWS, columns=cols, use_threads=False)


def _with_se2(batch: pa.RecordBatch | pa.Table) -> pa.Table:
    t = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    return t.append_column("se2", pc.multiply(t["value_se"], t["value_se"]))


def _total_rows(rows: list[dict]) -> list[dict]:
    for r in rows:
        se2 = r.pop("se2")
        r["se"] = se2 ** 0.5 if se2 is not None and se2 == se2 else None
        r["noise"] = "" if r["se"] is None else ("within noise" if abs(r["value"]) < 2 * r["se"] else "")
    return rows


class SampleTotals:
    """sample_totals streamed: each batch's occurrences grouped by (sample_id, source) in
    float64, the partial groups merged whenever they outgrow the merged ones, so it holds
    O(distinct samples) rows, never O(occurrences); `extremes` turns only the top and bottom
    k into Python rows."""

    def __init__(self):
        self.merged: pa.Table | None = None
        self.parts: list[pa.Table] = []
        self.part_rows = 0

    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        t = _with_se2(batch)
        g = t.group_by(["sample_id", "source"], use_threads=False).aggregate(
            [("value", "sum"), ("step", "count"), ("se2", "sum")])
        self.parts.append(g.rename_columns(["sample_id", "source", "value", "n_occurrences", "se2"]))
        self.part_rows += g.num_rows
        if self.part_rows > max(SCAN_ROWS, self.merged.num_rows if self.merged is not None else 0):
            self._merge()

    def _merge(self) -> None:
        tables = ([self.merged] if self.merged is not None else []) + self.parts
        if tables:
            g = pa.concat_tables(tables).group_by(["sample_id", "source"], use_threads=False).aggregate(_TOTALS)
            self.merged = g.rename_columns(["sample_id", "source", "value", "n_occurrences", "se2"])
        self.parts, self.part_rows = [], 0

    def table(self) -> pa.Table:
        """Every sample's totals, best first (what sample_totals lists)."""
        self._merge()
        if self.merged is None:
            return pa.table({"sample_id": pa.array([], pa.int64()), "source": pa.array([], pa.string()),
                             "value": pa.array([], pa.float64()), "n_occurrences": pa.array([], pa.int64()),
                             "se2": pa.array([], pa.float64())})
        return self.merged.sort_by([("value", "descending")])

    def extremes(self, k: int) -> tuple[list[dict], list[dict]]:
        """The k best samples (best first) and the k worst (worst first)."""
        g = self.table()
        top = _total_rows(g.slice(0, k).to_pylist())
        bottom = _total_rows(g.slice(max(0, g.num_rows - k)).to_pylist()[::-1])
        return top, bottom


def _radix_select(ratios: Callable[[], Iterator[np.ndarray]], k: int) -> float:
    """The k-th smallest (0-based) of the non-negative float64 values the passes yield,
    exactly: their bit patterns order like the values, so each pass counts the candidates by
    16 more bits of their patterns, until few enough remain to be collected and sorted."""
    lo, width = 0, 1 << 64  # candidate patterns [lo, lo + width)
    while True:
        hi = np.uint64(lo + width - 1)
        shift = max(0, width.bit_length() - 17)
        bins = ((width - 1) >> shift) + 1
        counts = np.zeros(bins, np.int64)
        for r in ratios():
            b = r.view(np.uint64)
            b = b[(b >= np.uint64(lo)) & (b <= hi)]
            counts += np.bincount(((b - np.uint64(lo)) >> np.uint64(shift)).astype(np.int64), minlength=bins)
        cum = np.cumsum(counts)
        i = int(np.searchsorted(cum, k, side="right"))  # the bin holding the k-th
        k -= int(cum[i - 1]) if i else 0
        lo, width = lo + (i << shift), min(1 << shift, width - (i << shift))
        if width == 1:
            return float(np.array([lo], np.uint64).view(np.float64)[0])
        if counts[i] <= MEDIAN_CAP:
            low, high = np.uint64(lo), np.uint64(lo + width - 1)
            kept = [r[(r.view(np.uint64) >= low) & (r.view(np.uint64) <= high)] for r in ratios()]
            return float(np.sort(np.concatenate(kept))[k])


class OccurrenceStats:
    """What the report shows of all occurrences, in one streaming pass and O(1) memory:
    their number, the mean value per bucket of steps (figures.step_buckets) and the share of
    values within 2 SE of zero; the median |value|/SE takes further passes (_radix_select)."""

    def __init__(self, num_steps: int, buckets: int = 20):
        self.buckets = max(1, min(buckets, num_steps))
        self.edges = np.linspace(0, num_steps, self.buckets + 1)
        self.total = np.zeros(self.buckets)
        self.count = np.zeros(self.buckets, np.int64)
        self.rows = self.se_rows = self.ok = self.noisy = 0

    def add(self, batch: pa.RecordBatch) -> None:
        steps, values = batch.column("step").to_numpy(), batch.column("value").to_numpy()
        which = np.clip(np.searchsorted(self.edges, steps, side="right") - 1, 0, self.buckets - 1)
        self.total += np.bincount(which, weights=values, minlength=self.buckets)
        self.count += np.bincount(which, minlength=self.buckets)
        self.rows += batch.num_rows
        r = self.ratio(batch)
        if r is not None:
            self.se_rows += batch.num_rows - batch.column("value_se").null_count
            self.ok += len(r)
            self.noisy += int(np.count_nonzero(r < 2))

    @staticmethod
    def ratio(batch: pa.RecordBatch) -> np.ndarray | None:
        if "value_se" not in batch.schema.names:
            return None
        v = batch.column("value").to_numpy()
        se = batch.column("value_se").to_numpy(zero_copy_only=False)
        ok = se > 0
        return np.abs(v[ok]) / se[ok]

    def step_means(self) -> tuple[np.ndarray, np.ndarray]:
        return self.edges[:-1], np.divide(self.total, self.count, out=np.zeros(self.buckets), where=self.count > 0)


def noise_figures(run: Run, stats: OccurrenceStats) -> tuple[float, float] | None:
    """(median |value|/SE, share below 2) over the occurrences with an SE, as np.median and
    np.mean over the whole table give them; None when no occurrence has one."""
    if stats.se_rows == 0:
        return None
    n = stats.ok

    def ratios():
        for b in scan_samples(run, ["value", "value_se"]):
            yield OccurrenceStats.ratio(b)

    if n == 0:
        return float("nan"), float("nan")
    a = _radix_select(ratios, (n - 1) // 2)
    median = a if n % 2 else (a + _radix_select(ratios, n // 2)) / 2
    return median, stats.noisy / n


def _cell(value, fmt, column: str = "") -> str:
    """A table cell; a number also carries its unrounded value, which the table sort uses; a
    text column wraps (class "text")."""
    text = html.escape(fmt(value))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td data-v="{value!r}">{text}</td>'
    return f'<td class="text">{text}</td>' if column == "text" else f"<td>{text}</td>"


def _table(rows: list[dict], columns: list[str], fmt: dict | None = None, foot: int = 0) -> str:
    """A table the page's script makes sortable and filterable; the last `foot` rows (totals)
    go in a <tfoot>, which neither sorting nor filtering moves."""
    fmt = fmt or {}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    split = len(rows) - foot if foot else len(rows)
    body, tail = ("".join("<tr>" + "".join(_cell(r[c], fmt.get(c, str), c) for c in columns) + "</tr>"
                          for r in part)
                  for part in (rows[:split], rows[split:]))
    # the wrapper scrolls a table wider than the page instead of the page
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            f"{f'<tfoot>{tail}</tfoot>' if tail else ''}</table></div>")


STAGES = ("data", "train", "embed", "reduce")


def timing_rows(timings: dict) -> list[dict]:
    """Stage wall times in pipeline order (other recorded stages after them) and their total."""
    order = [s for s in STAGES if s in timings] + sorted(set(timings) - set(STAGES))
    rows = [{"stage": s, "seconds": f"{float(timings[s]):.1f}"} for s in order]
    if rows:
        rows.append({"stage": "total", "seconds": f"{sum(float(v) for v in timings.values()):.1f}"})
    return rows


def step_caption(starts, means, num_steps: int) -> str:
    """What the step chart shows for this run, in numbers (not what runs typically show)."""
    if len(means) == 0:
        return "No occurrences were valued."
    top = int(abs(means).argmax())
    q = max(1, len(means) // 4)
    end = starts[top + 1] if top + 1 < len(starts) else num_steps
    span = f"steps {starts[top]:.0f}–{end:.0f}"
    return (f"Mean value of one occurrence per bucket of training steps. The largest mean in size is "
            f"{means[top]:.3g}, in {span}; the first quarter of the buckets averages {means[:q].mean():.3g} "
            f"and the last quarter {means[-q:].mean():.3g} per occurrence.")


def phase_caption(phases: pa.Table) -> str:
    """What the phase figure shows for this run, computed from the same grid it draws."""
    sources, labels, grid = figures.phase_means(phases)
    if not sources or not np.isfinite(grid).any():
        return "No occurrences were valued."
    size = np.where(np.isfinite(grid), np.abs(grid), -1.0)
    i, j = np.unravel_index(int(np.argmax(size)), grid.shape)
    col_means = np.nanmean(np.abs(grid), axis=0)
    loudest = int(np.nanargmax(col_means))
    where = ("the last phase" if loudest == len(labels) - 1 else
             "the first phase" if loudest == 0 else f"steps {labels[loudest]}")
    text = (f"Each cell is the mean value of one occurrence of that source in that phase; sources are sorted by "
            f"their value per occurrence over the whole run. The largest cell in size is {grid[i, j]:.3g} "
            f"({sources[i]}, steps {labels[j]}); cells are largest on average in {where} "
            f"(mean |value| {col_means[loudest]:.3g} per occurrence, against {np.nanmean(np.abs(grid)):.3g} "
            "over all cells).")
    totals = {r: np.nansum(grid[k]) for k, r in enumerate(sources)}
    flipped = [r for k, r in enumerate(sources)
               if np.isfinite(grid[k, -1]) and grid[k, -1] != 0 and np.sign(grid[k, -1]) != np.sign(totals[r])]
    if flipped:
        text += (f" In the last phase {', '.join(flipped)} {'has' if len(flipped) == 1 else 'have'} the opposite "
                 "sign to the source's sum over phases: what it did to the final model at the end of training, "
                 "not overall.")
    return text


def sample_table(rows: list[dict], what: str, columns: list[str], fmt: dict) -> list[str]:
    """A ranked sample list, the rows clear of noise first, and a sentence saying how many
    are within noise (or that none is clear)."""
    clear, within = split_by_noise(rows, "noise")
    return [f"<p>{html.escape(noise_sentence(len(clear), len(within), what))}.</p>",
            _table(clear + within, columns, fmt)]


def validation_text(validation: pa.Table) -> str:
    """A sentence on the validation set the values refer to."""
    counts = validation.group_by("source").aggregate([("source", "count")]).to_pylist()
    parts = ", ".join(f"{html.escape(str(c['source']))} ({c['source_count']})"
                      for c in sorted(counts, key=lambda c: -c["source_count"]))
    return (f"<p>Values refer to the validation set: {validation.num_rows} texts, by source: {parts}. "
            "The value of an occurrence is how much the loss on these texts would rise without it.</p>")


def _img(name: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" data-file="{name}"></figure>'


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:980px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f1f3f5}td.text{min-width:16em;max-width:520px;overflow-wrap:anywhere}img{max-width:100%}
.scroll{max-width:100%;overflow-x:auto}.trust{border:2px solid #0072b2;border-radius:6px;padding:.2em 1.2em;
margin:1em 0 1.5em;background:#f5f9fc}.trust h2{margin-top:.6em}
pre{background:#f8f9fa;padding:1em;overflow:auto;font-size:12px}.neg{color:#d55e00}.pos{color:#0072b2}
tfoot td{font-weight:bold}th[tabindex]{cursor:pointer;user-select:none}th[tabindex]:after{content:" \\2195";color:#999}
th[aria-sort=ascending]:after{content:" \\25B2";color:#222}th[aria-sort=descending]:after{content:" \\25BC";color:#222}
.filter{margin:.5em 0 0;padding:2px 6px;width:16em}.filter+span{margin-left:.8em;color:#555;font-size:90%}"""

# Sorting and filtering of every table, inline (the report works offline and fetches nothing).
# Without JavaScript the tables are plain and complete; the script only adds to them.
_JS = r"""(function () {
  "use strict";
  var NUMBER = /^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$/i;
  function key(td) {  // numbers by value (unrounded where the cell has data-v), the rest as text
    var v = td.getAttribute("data-v"), t = td.textContent.trim();
    var n = parseFloat(v !== null ? v : t);
    return (v !== null || NUMBER.test(t)) && !isNaN(n) ? n : t;
  }
  function compare(a, b) {
    var an = typeof a === "number", bn = typeof b === "number";
    if (an && bn) return a - b;
    if (an !== bn) return an ? -1 : 1;  // numbers before text
    return a.localeCompare(b, undefined, {numeric: true, sensitivity: "base"});
  }
  function sortBy(table, col) {  // first click ascending, the next descending, and so on
    var cells = table.tHead.rows[0].cells, th = cells[col];
    var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    for (var i = 0; i < cells.length; i++) cells[i].removeAttribute("aria-sort");
    th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (r, s) { return dir * compare(key(r.cells[col]), key(s.cells[col])); });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  function filter(table, box, count) {  // rows holding every word typed, in any column
    var words = box.value.toLowerCase().split(/\s+/).filter(Boolean);
    var rows = table.tBodies[0].rows, shown = 0;
    for (var i = 0; i < rows.length; i++) {
      var text = rows[i].textContent.toLowerCase();
      rows[i].hidden = !words.every(function (w) { return text.indexOf(w) >= 0; });
      if (!rows[i].hidden) shown++;
    }
    count.textContent = words.length ? shown + " of " + rows.length + " rows" : "";
  }
  Array.prototype.forEach.call(document.querySelectorAll("table"), function (table) {
    if (!table.tHead || !table.tBodies.length) return;
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.tabIndex = 0;
      th.title = "Sort by " + th.textContent;
      th.addEventListener("click", function () { sortBy(table, col); });
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(table, col); }
      });
    });
    var box = document.createElement("input"), count = document.createElement("span");
    box.type = "search";
    box.className = "filter";
    box.placeholder = "Filter rows";
    box.setAttribute("aria-label", "Filter the rows of the table below");
    box.addEventListener("input", function () { filter(table, box, count); });
    var bar = document.createElement("div");
    bar.appendChild(box);
    bar.appendChild(count);
    table.parentNode.insertBefore(bar, table);
  });
})();"""


def write_report(run: Run, out_dir: str | Path, k: int = 10) -> Path:
    """Write report.html and its PNGs into out_dir; returns the path of report.html."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = run.manifest
    num_steps = int(m.get("num_steps", 1))
    # one streaming pass over the occurrences (never the whole table): the step buckets, the
    # noise counts and the per-sample totals (O(distinct samples))
    stats, sample_sums = OccurrenceStats(num_steps), SampleTotals()
    for batch in scan_samples(run):
        stats.add(batch)
        sample_sums.add(batch)
    sources = run.read_table(SOURCE_VALUES)
    phases = run.read_table(PHASE_VALUES)
    steps = stats.step_means()
    pngs = {
        "sources.png": (figures.source_bars(sources), "value per sample of each source"),
        "steps.png": (figures.step_bars(*steps), "mean value of an occurrence against training step"),
        "phases.png": (figures.phase_heatmap(phases), "mean value per occurrence by source and training phase"),
    }
    loss = loss_summary(run.step_losses())
    if loss:
        pngs["loss.png"] = (figures.loss_curve(loss["steps"], loss["loss"]), "training loss per step")
    for name, (png, _) in pngs.items():
        (out / name).write_bytes(png)

    from rayattr.data.run_data import texts_by_id  # the data package needs torch; the module must not

    top, bottom = sample_sums.extremes(k)
    shown = top + bottom  # only the rows the page shows get their text fetched
    texts = texts_by_id(run, [r["sample_id"] for r in shown])
    for r in shown:
        r["text"] = texts.get(r["sample_id"])
    num = lambda v: f"{v:.4g}"  # noqa: E731
    sample_cols = ["sample_id", "source", "n_occurrences", "value", "se", "noise", "text"]
    fmt = {"value": num, "se": lambda v: "–" if v is None else f"{v:.2g}"}
    timings = m.get("timings") or {}
    noise = noise_figures(run, stats)
    parts = [
        f"<h1>rayattr run {html.escape(run.run_id)}</h1>",
        *trust_box(run, sources, noise),
        f"<p><code>{html.escape(run.uri)}</code> — status <b>{html.escape(str(m.get('status')))}</b>, "
        f"model {html.escape(str(m.get('model', {}).get('family')))}, {m.get('num_steps')} steps, "
        f"{m.get('n_train')} training samples, {sources.num_rows} sources, {stats.rows} occurrences, "
        f"{m.get('segments')} segments.</p>",
        "<p>Value = predicted increase of the validation loss if a training occurrence were removed "
        "(Data Value Embedding): positive helped, negative hurt.</p>",
        validation_text(run.read_table(VALIDATION_DATA)),
        "<h2>Sources</h2>", _img("sources.png", *pngs["sources.png"]),
        "<p>Each bar is a source's value divided by its number of distinct samples; the whiskers "
        "are its 95 % bootstrap interval over occurrences. Blue helped the validation loss, "
        "vermillion hurt it.</p>",
        _table(sources.to_pylist(), sources.column_names,
               {"value": num, "value_per_sample": num, "value_low": num, "value_high": num}),
        "<p>value_low and value_high bound the source's value by a 95 % bootstrap over its occurrences: "
        "how much it rests on which occurrences the source happened to have. Training randomness "
        "(the seed) is not in it; see the trust section below.</p>",
        "<h2>When in training</h2>", _img("steps.png", *pngs["steps.png"]),
        f"<p>{html.escape(step_caption(*steps, num_steps))}</p>",
        _img("phases.png", *pngs["phases.png"]),
        f"<p>{html.escape(phase_caption(phases))}</p>",
        *(["<h2>Training loss</h2>", _img("loss.png", *pngs["loss.png"]),
           "<p>The mean training loss of each optimizer step's global batch, as the ranks recorded it "
           "(the values above refer to the validation loss at the last step).</p>"]
          if "loss.png" in pngs else []),
        f"<h2>Most helpful samples (top {k})</h2>",
        *sample_table([r for r in top if r["value"] > 0], "most helpful samples", sample_cols, fmt),
        f"<h2>Most harmful samples (bottom {k})</h2>",
        *sample_table([r for r in bottom if r["value"] < 0], "most harmful samples", sample_cols, fmt),
        *trust_section(run, noise, out, _img),
        "<h2>Stage timings</h2>",
        _table(timing_rows(timings), ["stage", "seconds"], foot=1),  # the total stays last
        "<h2>Configuration</h2>", f"<pre>{html.escape(yaml.safe_dump(m.get('config', {}), sort_keys=False))}</pre>",
        f"<p><small>rayattr {html.escape(str(m.get('rayattr_version')))}, report written "
        f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}</small></p>",
    ]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>rayattr {html.escape(run.run_id)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}<script>{_JS}</script></body></html>")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
