"""report.html of a real run: self-contained, figures beside it, and it renders in Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import matplotlib.image as mpimg
import numpy as np
import pytest

from rayattr.report.figures import step_buckets
from rayattr.store import Run


@pytest.fixture(scope="module")
def report(finished_run, tmp_path_factory):
    run = Run.open_uri(finished_run[1])
    from rayattr.report.html import write_report

    return run, write_report(run, tmp_path_factory.mktemp("report"))


def test_report_contents(report):
    run, path = report
    page = path.read_text()
    for name in ("sources.png", "steps.png", "phases.png"):
        png = (path.parent / name).read_bytes()
        assert png.startswith(b"\x89PNG")
        assert base64.b64encode(png).decode() in page  # inlined: the page stands alone
        pixels = mpimg.imread(path.parent / name)
        assert pixels.std() > 0.01  # a real figure, not an empty canvas
    # nothing fetched from anywhere: one inline script, no external src/href/url()
    assert re.findall(r"<script\b[^>]*>", page) == ["<script>"]
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:[a-z][\w+.-]*:)?//|url\(\s*["']?(?:https?:)?//|@import""",
                         page, re.I)
    assert "http" not in page[page.index("<script>"):]  # nor does the script (XHR, fetch or a CDN)
    assert '<th>value_per_sample</th>' in page and 'addEventListener("click"' in page
    for s in run.read_table("values/sources.parquet")["source"].to_pylist():
        assert f"<td>{s}</td>" in page
    # top and bottom samples with their (escaped) text, the config and the stage timings
    assert "Most helpful samples" in page and "Most harmful samples" in page
    assert "&lt;" in page or "&amp;" in page or "&#x27;" in page  # texts are escaped
    assert "seq_len: 32" in page and re.search(r"<td>train</td><td>\d+\.\d</td>", page)
    stages = re.findall(r"<tr><td>(\w+)</td><td>\d+\.\d</td></tr>", page)
    assert stages == ["data", "train", "embed", "reduce", "total"]  # pipeline order, then the sum
    assert re.search(r"<tfoot><tr><td>total</td>", page)  # sorting the stages leaves the total last
    # numbers carry their unrounded value for sorting: the sources table's value_per_sample column
    sources = run.read_table("values/sources.parquet").to_pylist()
    assert f'<td data-v="{sources[0]["value_per_sample"]!r}">{sources[0]["value_per_sample"]:.4g}</td>' in page


def test_step_buckets_are_means_of_occurrences(report):
    run, _ = report
    samples = run.read_table("values/samples.parquet")
    starts, means = step_buckets(samples, 20, buckets=4)
    steps, values = samples["step"].to_numpy(), samples["value"].to_numpy()
    assert starts.tolist() == [0, 5, 10, 15]
    for a, m in zip(starts, means):
        assert m == pytest.approx(values[(steps >= a) & (steps < a + 5)].mean())


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium binary (Debian: apt-get install chromium)")


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with nothing that reaches the network on its own."""
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120, check=True)


@needs_chromium
def test_report_renders_in_headless_chromium(report, tmp_path):
    _, path = report
    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1100,2400", path.as_uri())
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2400, 1100)
    # not blank: many distinct colours, and the figures' blue (helpful) bars are on screen
    colours = np.unique((pixels.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colours) > 50
    blue = (pixels[..., 2] > 0.55) & (pixels[..., 0] < 0.2) & (pixels[..., 1] > 0.3) & (pixels[..., 1] < 0.6)
    assert blue.sum() > 1000


class Tables(HTMLParser):
    """The tables of a page as Chromium left them: per table, its headers with their aria-sort,
    and its body rows (cell texts, hidden or not)."""

    def __init__(self):
        super().__init__()
        self.tables, self.cell, self.part = [], None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append({"headers": [], "sort": [], "rows": []})
        elif tag in ("thead", "tbody", "tfoot"):
            self.part = tag
        elif tag == "tr" and self.part == "tbody":
            self.tables[-1]["rows"].append({"cells": [], "hidden": "hidden" in a})
        elif tag in ("th", "td"):
            self.cell = []
            if tag == "th":
                self.tables[-1]["sort"].append(a.get("aria-sort"))

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self.cell is not None:
            text = "".join(self.cell).strip()
            if tag == "th":
                self.tables[-1]["headers"].append(text)
            elif self.part == "tbody":
                self.tables[-1]["rows"][-1]["cells"].append(text)
            self.cell = None
        elif tag in ("thead", "tbody", "tfoot"):
            self.part = None


def dom_tables(dom: str) -> list[dict]:
    parser = Tables()
    parser.feed(dom)
    return parser.tables


# What a user does, as a script after the page's own: click headers, type into a filter box.
# Chromium runs it with the page's handlers and --dump-dom prints the DOM it leaves.
CLICKS = """<script>
var tables = document.querySelectorAll("table");
function header(t, name) {
  return Array.prototype.find.call(tables[t].tHead.rows[0].cells, function (th) { return th.textContent === name; });
}
header(0, "value_per_sample").click();                 // sources: ascending
header(1, "value").click(); header(1, "value").click(); // most helpful: ascending, then descending
header(2, "source").dispatchEvent(new KeyboardEvent("keydown", {key: "Enter"}));  // by keyboard
header(3, "seconds").click();                           // stage timings: ascending, total stays last
var box = tables[2].previousElementSibling.querySelector("input[type=search]");
box.value = %s;
box.dispatchEvent(new Event("input"));
</script></body>"""


@needs_chromium
def test_report_tables_sort_and_filter_in_headless_chromium(report, tmp_path):
    run, path = report
    page = path.read_text()
    harmful = dom_tables(page)[2]
    word = harmful["rows"][0]["cells"][1]  # a source among the most harmful samples
    clicked = tmp_path / "report.html"
    clicked.write_text(page.replace("</body>", CLICKS % json.dumps(word.upper())))  # case-insensitive
    dom = chromium(tmp_path, "--dump-dom", clicked.as_uri()).stdout
    before, after = dom_tables(page), dom_tables(dom)
    assert [t["headers"] for t in after] == [t["headers"] for t in before]
    assert "Filter rows" in dom and dom.count('type="search"') == len(after)  # a filter box per table

    def column(table, name):
        i = table["headers"].index(name)
        return [r["cells"][i] for r in table["rows"]]

    # sources by value per sample, ascending: the parquet's order (best first) reversed
    sources = run.read_table("values/sources.parquet").sort_by("value_per_sample").to_pylist()
    assert column(after[0], "source") == [s["source"] for s in sources]
    assert column(before[0], "source") != column(after[0], "source")
    assert after[0]["sort"][after[0]["headers"].index("value_per_sample")] == "ascending"
    # the second click on a header turns the order round: most helpful back to best first
    helpful = [float(v) for v in column(after[1], "value")]
    assert helpful == sorted(helpful, reverse=True) and after[1]["sort"].count("descending") == 1
    assert sorted(column(after[1], "sample_id")) == sorted(column(before[1], "sample_id"))
    # most harmful sorted by source name, keyboard-driven, and filtered to one source's rows
    names = column(after[2], "source")
    assert names == sorted(names, key=str.lower)
    shown = [r["cells"][1] for r in after[2]["rows"] if not r["hidden"]]
    assert shown == [r["cells"][1] for r in after[2]["rows"] if word.lower() in "".join(r["cells"]).lower()]
    assert word in shown
    assert len(shown) < len(names) or len(set(names)) == 1
    assert f"{len(shown)} of {len(names)} rows" in dom
    # stage timings: numerically ascending in the body, the total (in the foot) not among them
    seconds = [float(v) for v in column(after[3], "seconds")]
    assert seconds == sorted(seconds) and "total" not in column(after[3], "stage")


def test_trust_section_before_and_after_validation(finished_run, validated_run, tmp_path):
    """Unvalidated: the report says so and how to validate; after `rayattr validate` (its own
    process and Ray: the session's validated copy of the same run) it shows LDS, source
    Spearman, the scatter plots and a verdict. Ranked samples carry the projection's standard
    error."""
    from rayattr.report.html import write_report

    run = Run.open_uri(finished_run[1])  # the shared run, never validated (nothing is written into it)
    page = write_report(run, tmp_path / "before").read_text()
    assert "How far to trust this run" in page and "has not been validated" in page
    assert page.index('<section class="trust"') < page.index("<figure>")  # the box opens the page
    assert "Verdict: not validated yet." in page and f"rayattr validate {run.run_id}" in page
    assert "Projection noise" in page and "<th>se</th>" in page
    # the step size against curvature the divergence guard measured, and what it means
    el = run.manifest["max_eta_lambda"]
    assert f"η·λ_max(H) of any step was {el:.2g}" in page
    assert ("less reliably" in page) == (el > 2) and ("Below 2 throughout" in page) == (el <= 2)
    # and where gradient clipping acted, that the values hold its factor fixed
    clipped = sum(r.clip < 1.0 for r in run.step_records())
    assert run.manifest["clipped_steps"] == clipped
    assert (f"Gradient clipping acted at {clipped} of {run.manifest['num_steps']} steps" in page) == (clipped > 0)
    trusted = Run.open_uri(validated_run.uri)
    # validate says what shows its results, and ends with the verdict
    out = validated_run.stdout
    assert f"rayattr report {validated_run.uri}" in out and out.rstrip().splitlines()[-1].startswith("verdict: ")
    path = write_report(trusted, tmp_path / "after")
    page = path.read_text()
    assert "has not been validated" not in page and "LDS (Spearman" in page and "Verdict:" in page
    box = page[page.index('<section class="trust"'):page.index("</section>")]
    assert "not validated yet" not in box and "LDS " in box and "Sources left out one at a time" in box
    from rayattr.report.summary import format_summary, run_summary

    shown = format_summary(run_summary(trusted))
    assert "not validated" not in shown and re.search(r"^verdict\s+\S", shown, re.M)
    for name in ("validation_sources.png", "validation_subsets.png"):
        assert (path.parent / name).read_bytes().startswith(b"\x89PNG") and name in page


def test_verdict_reads_the_figures():
    from rayattr.validate.validation import verdict

    assert verdict({"lds": 0.93, "source_spearman": 0.9}).startswith("The values predict")
    assert "roughly" in verdict({"lds": 0.6, "source_spearman": None})
    far = verdict({"lds": 0.1, "source_spearman": -0.2, "occurrence_actual_rms": 8e-3,
                   "occurrence_predicted_rms": 1e-3})
    assert "hypotheses" in far and "8×" in far
    assert "Too few" in verdict({"lds": None, "source_spearman": None})


def test_sources_apart_are_those_whose_interval_overlaps_no_other():
    import pyarrow as pa

    from rayattr.report.html import separated_sources

    table = pa.table({"source": ["a", "b", "c", "d"], "value": [1.0, 0.9, -0.5, 3.0],
                      "value_low": [0.5, 0.8, -0.9, 2.0], "value_high": [1.5, 1.0, -0.1, 4.0]})
    apart, n = separated_sources(table)
    assert n == 4 and apart == ["c", "d"]  # a and b overlap each other
    assert separated_sources(table.drop_columns(["value_low", "value_high"])) == ([], 0)


# Measures the layout Chromium gave the page and leaves it in the DOM (--dump-dom prints it).
LAYOUT = """<script>
var trust = document.getElementById("trust"), fig = document.querySelector("figure");
var widest = 0;
Array.prototype.forEach.call(document.querySelectorAll(".scroll"), function (s) {
  widest = Math.max(widest, s.getBoundingClientRect().right);
});
var pre = document.createElement("pre");
pre.id = "layout";
pre.textContent = JSON.stringify({
  viewport: window.innerWidth, page: document.documentElement.scrollWidth, widest: widest,
  trustTop: trust.getBoundingClientRect().top, trustBottom: trust.getBoundingClientRect().bottom,
  figureTop: fig.getBoundingClientRect().top, tables: document.querySelectorAll(".scroll table").length});
document.body.appendChild(pre);
</script></body>"""


@needs_chromium
@pytest.mark.parametrize("width", [1400, 800])
def test_report_opens_with_the_trust_box_and_fits_the_window(report, tmp_path, width):
    """At 1400 and 800 px: the trust box is the first thing on screen, before any figure; no
    table makes the page scroll sideways (a wide table scrolls in its own box); a screenshot of
    the first screen shows the box's blue frame."""
    _, path = report
    page = path.read_text()
    measured = tmp_path / "report.html"
    measured.write_text(page.replace("</body>", LAYOUT))
    dom = chromium(tmp_path, "--dump-dom", f"--window-size={width},1000", measured.as_uri()).stdout
    layout = json.loads(re.search(r'<pre id="layout">(.*?)</pre>', dom, re.S).group(1))
    assert layout["tables"] == 4  # sources, most helpful, most harmful, stage timings
    assert layout["page"] <= layout["viewport"] and layout["widest"] <= layout["viewport"], layout
    assert layout["trustTop"] < 200 and layout["trustBottom"] < layout["figureTop"], layout
    assert layout["trustBottom"] < 1000  # the whole box on the first screen
    shot = tmp_path / f"shot{width}.png"
    chromium(tmp_path, f"--screenshot={shot}", f"--window-size={width},1000", path.as_uri())
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1000, width)
    frame = (np.abs(pixels[..., 0] - 0x00 / 255) < 0.1) & (np.abs(pixels[..., 1] - 0x72 / 255) < 0.1) \
        & (np.abs(pixels[..., 2] - 0xB2 / 255) < 0.1)  # the box's #0072b2 border
    assert frame[: int(layout["trustBottom"]) + 5].sum() > 2 * width * 0.5, frame.sum()
