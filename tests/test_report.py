"""report.html of a real run: self-contained, figures beside it, and it renders in Chromium."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess

import matplotlib.image as mpimg
import numpy as np
import pytest

from rayattr.report.figures import step_buckets
from rayattr.store import Run


@pytest.fixture(scope="module")
def report(finished_run, tmp_path_factory):
    run = Run.open_uri(finished_run[1])
    from rayattr.report import write_report

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
    assert "src=\"http" not in page and "<script" not in page  # nothing fetched from anywhere
    for s in run.read_table("values/sources.parquet")["source"].to_pylist():
        assert f"<td>{s}</td>" in page
    # top and bottom samples with their (escaped) text, the config and the stage timings
    assert "Most helpful samples" in page and "Most harmful samples" in page
    assert "&lt;" in page or "&amp;" in page or "&#x27;" in page  # texts are escaped
    assert "seq_len: 32" in page and re.search(r"<td>train</td><td>\d+\.\d</td>", page)
    stages = re.findall(r"<tr><td>(\w+)</td><td>\d+\.\d</td></tr>", page)
    assert stages == ["data", "train", "embed", "reduce", "total"]  # pipeline order, then the sum


def test_step_buckets_are_means_of_occurrences(report):
    run, _ = report
    samples = run.read_table("values/samples.parquet")
    starts, means = step_buckets(samples, 20, buckets=4)
    steps, values = samples["step"].to_numpy(), samples["value"].to_numpy()
    assert starts.tolist() == [0, 5, 10, 15]
    for a, m in zip(starts, means):
        assert m == pytest.approx(values[(steps >= a) & (steps < a + 5)].mean())


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium binary (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    _, path = report
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1100,2400",
                    path.as_uri()], capture_output=True, timeout=120, check=True)
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2400, 1100)
    # not blank: many distinct colours, and the figures' blue (helpful) bars are on screen
    colours = np.unique((pixels.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colours) > 50
    blue = (pixels[..., 2] > 0.55) & (pixels[..., 0] < 0.2) & (pixels[..., 1] > 0.3) & (pixels[..., 1] < 0.6)
    assert blue.sum() > 1000
