"""The README as a new user reads it: the quick start within its first 60 lines, every `rayattr`
command in it parses, every path and link in it and in the docs pages it links exists, the job's
summary it shows is what the job prints, and its gc paragraph names what `gc --dry-run` lists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from rayattr.cli import main, parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]


def bash_lines(text: str) -> list[str]:
    """Commands of the ```bash blocks, comments taken off."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        out += [re.sub(r"\s+#.*$", "", ln).strip() for ln in block.splitlines() if ln.strip()]
    return out


def test_the_quick_start_is_in_the_first_60_lines():
    head = "\n".join(README.splitlines()[:60])
    assert "## Quick start" in head and "pip install" in head
    assert re.search(r"^python jobs/pretrain_attr\.py", head, re.M)
    for command in ("values", "query", "validate", "report"):
        assert re.search(rf"^rayattr {command} RUN\b", head, re.M), command
        assert f"- `{command}`" in head  # and what it prints


def rayattr_commands() -> list[str]:
    lines = [ln for ln in bash_lines(README) if ln.startswith("rayattr ")]
    spans = [s for s in re.findall(r"`(rayattr [^`]+)`", README) if "[" not in s and "..." not in s]
    return sorted(set(lines + spans))


@pytest.mark.parametrize("command", rayattr_commands())
def test_every_rayattr_command_in_the_readme_parses(command):
    argv = shlex.split(command.replace("RUN", "run-20261124-101500").replace("CONFIG", "c.yaml"))[1:]
    if argv[0] in ("train", "plan", "--help", "--version"):
        return  # their own parsers (rayattr train --help, rayattr plan --help), or argparse's actions
    subcommands = parser()._subparsers._group_actions[0].choices
    assert argv[0] in subcommands
    if len(argv) > 1:  # `rayattr show` alone names the command in the text
        parser().parse_args(argv)  # a wrong flag exits (SystemExit) and fails the test


def repo_paths(text: str) -> set[str]:
    spans = re.findall(r"`([^`\s]+)`", text) + re.findall(r"\]\(([^)#\s]+)\)", text)
    return {s.rstrip(".,:;") for s in spans
            if re.match(r"(\.\./)?(jobs|docs|bench|rayattr|infra|tests)/[\w./-]+$", s.rstrip(".,:;"))
            or s.endswith(".md")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_path_and_link_exists(page):
    text = page.read_text()
    missing = [p for p in repo_paths(text)
               if not (page.parent / p).exists() and not (ROOT / p).exists() and "<" not in p and "*" not in p]
    assert missing == [], missing


def test_the_summary_the_readme_shows_is_what_the_job_prints():
    """The README's rows, fed back through the job's own summary, print exactly as shown; so
    do the header and the sentence on which sources stand apart."""
    from types import SimpleNamespace

    from rayattr.pipeline.job import job_summary

    block = re.search(r"The job ends with.*?```\n(.*?)```", README, re.S).group(1)
    table = [ln for ln in block.splitlines() if ln.rstrip().endswith("]")]
    rows = []
    for line in table:
        name, n, per_sample, low, high = re.match(r"(\S+)\s+(\d+)\s+(\S+)\s+\[(\S+), (\S+)\]", line).groups()
        n = int(n)
        rows.append({"source": name, "n_samples": n, "value_per_sample": float(per_sample),
                     "value": float(per_sample) * n, "value_low": float(low) * n, "value_high": float(high) * n})
    printed = job_summary(SimpleNamespace(uri="u", num_steps=1, segments=1, timings={}, sources=rows), "r")
    lines = printed.splitlines()
    assert len(table) >= 2 and all(line in lines for line in table)
    assert next(ln for ln in block.splitlines() if ln.startswith("source ")) in lines  # the header
    sentence = [ln for ln in block.splitlines() if "stand" in ln]  # rows left out ("..."): its shape
    assert sentence and re.match(r"(\w+ \((hurt|helped)\) stands apart: 95% interval clear of every other "
                                 r"source's and of zero; the other \d+ sources' intervals overlap|no source stands "
                                 r"apart: each of the \d+ sources' 95% intervals overlaps another's or spans zero)",
                                 sentence[0])


def test_the_gc_paragraph_names_what_gc_dry_run_lists(tmp_path, capsys):
    """A finished run holding every gradient kind rayattr writes: the grads/ groups `gc --dry-run`
    lists are exactly those the README's gc paragraph names (the query embeddings stay)."""
    from rayattr.store.layout import FINAL_KIND, LOCAL_KIND
    from rayattr.store import Run
    from rayattr.store.layout import UPDATE_KIND, V_RESPONSE_KIND

    run = Run.create(str(tmp_path), "r", {"status": "done"})
    for kind in ("train", UPDATE_KIND, V_RESPONSE_KIND, "curvature", LOCAL_KIND, FINAL_KIND):  # as the writers leave them
        (tmp_path / "r" / "grads" / kind).mkdir(parents=True)
        (tmp_path / "r" / "grads" / kind / "shard.bin").write_bytes(b"x" * 10)
    assert main(["gc", run.uri, "--dry-run"]) == 0
    listed = set(re.findall(r"^(grads/\w+)", capsys.readouterr().out, re.M))
    paragraph = re.search(r"`rayattr gc RUN` deletes.*?\n\n", README, re.S).group(0)
    assert set(re.findall(r"`(grads/\w+)`", paragraph)) == listed == {
        "grads/train", "grads/update", "grads/v_response", "grads/curvature", "grads/local"}


def test_ci_installs_and_tests_as_the_readme_says():
    """.ci/run is the README's set-up from a clean checkout: the same installs (torch first, then
    the project at infra/constraints.txt's pins) and the test command the README names."""
    def installs(lines):
        out = []
        for line in lines:
            for part in line.split("&&"):
                words = [w for w in shlex.split(part.removeprefix("python -m ").strip()) if w != "-q"]
                if words[:2] == ["pip", "install"]:
                    out.append(words[2:])
        return out

    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    readme = installs(bash_lines(README))
    assert installs(ci) == readme[:2] and readme[1][:2] == ["-c", "infra/constraints.txt"]
    assert ci[-2:] == ["ruff check .", "python -m pytest -q"]
    assert "`python -m pytest -q`" in README
