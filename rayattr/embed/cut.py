"""The segments' cut of a run: [0, num_steps) into segments, recorded once embedding starts.

A segment's artefacts (K, R, sums, local embeddings) are named by its index; they hold its
step range only under the cut they were computed with. So the cut is recorded in run.json
(`segments`, `segment_bounds`) and a driver asking for another one while artefacts of the
first exist is refused, as `--resume` refuses a different `embed.segments`.
"""

from __future__ import annotations

from typing import Callable

from rayattr.config import ConfigError
from rayattr.math.dvemb import segment_bounds
from rayattr.store.layout import EMBED_PREFIXES

# what embedding leaves in a run before its K's: the segments' outputs and local-embedding writers


def embedding_started(run) -> bool:
    """Whether any segment artefact of a cut exists in the run."""
    return any(run._storage.find(p) for p in EMBED_PREFIXES)


def record_choice(run, key: str, value, default) -> None:
    """Record an embedding choice (`embed.<key>`) in the run's manifest; once a segment artefact
    exists, another value than the recorded one (`default` for runs from before the key) is
    refused: K's and embeddings computed both ways would mix."""
    recorded = run.manifest.get(key, default)
    if recorded != value and embedding_started(run):
        def word(x):
            return str(x).lower() if isinstance(x, bool) else str(x)
        raise ConfigError(f"run {run.uri}: its embedding started with embed.{key}: {word(recorded)}; "
                          f"{word(value)} would mix K's and embeddings of both. Run it with "
                          f"embed.{key}: {word(recorded)}")
    run.update_manifest(**{key: value})


def recorded_cut(run, num_steps: int) -> list[int] | None:
    """The bounds the run's embedding was started with (None: not started, or no artefact left)."""
    m = run.manifest
    bounds = m.get("segment_bounds")
    if bounds is None and m.get("segments"):
        bounds = segment_bounds(num_steps, int(m["segments"]))  # runs that recorded only the count
    if bounds is None or not embedding_started(run):
        return None
    return [int(b) for b in bounds]


def choose_segments(run, num_steps: int, requested: int | None, default: Callable[[], int] | None = None
                    ) -> tuple[int, list[int]]:
    """(segments, bounds) of the embedding: the recorded cut when embedding started, else
    `requested`, else `default()`. A requested cut other than the recorded one is refused."""
    cut = recorded_cut(run, num_steps)
    if cut is not None:
        n = len(cut) - 1
        if requested is not None and segment_bounds(num_steps, requested) != cut:
            raise ConfigError(
                f"run {run.uri}: its embedding started with {n} segments (step bounds {cut}); "
                f"{requested} segments would cut the steps differently and mix segments of both cuts. "
                f"Run it with --segments {n} (or without --segments)")
        return n, cut
    if requested is None and default is None:
        raise ConfigError("choose_segments: give the segments or a default")
    n = min(num_steps, requested if requested is not None else default())
    return n, segment_bounds(num_steps, n)
