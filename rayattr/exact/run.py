"""`rayattr exact RUN`: open the finished run, replay it, write exact/ and say how the values agree."""

from __future__ import annotations

from rayattr.exact.metagradient import exact_values, write_exact
from rayattr.exact.replay import ExactError, Replay
from rayattr.exact.sharpness import sharpness_sentence


def run_exact(uri, storage_options: dict | None = None, every: int | None = None, freeze: frozenset = frozenset(),
              progress: bool = True, anchor: bool = True) -> tuple[str, dict]:
    """Exact values of a finished run written to its exact/ directory; (run URI, summary)."""
    from rayattr.store import StoreOptions, open_run_ref

    run = uri if not isinstance(uri, str) else open_run_ref(
        uri.rstrip("/"), StoreOptions(storage_options=dict(storage_options or {})), mode="record")
    if run.manifest.get("status") != "done":
        raise ExactError(f"run '{run.run_id}' is not finished (status '{run.manifest.get('status')}'): "
                         "its trajectory must be complete to be replayed")
    result = exact_values(Replay(run), every=every, freeze=freeze, progress=progress, anchor=anchor)
    return run.uri, write_exact(run, result)


def format_exact(uri: str, summary: dict) -> str:
    """The summary as the command prints it."""
    lines = [f"exact first-order values of {uri}: {summary['occurrences']} occurrences over "
             f"{summary['num_steps']} steps in {summary['total_s']:.1f} s, written to {uri}/exact/"]
    if summary.get("anchors"):
        lines.append(f"re-seated on the run's own state at {summary['anchors']} steps (the replay stood at most "
                     f"{summary['anchor_max_relative_distance']:.1e} from it there, relative)")
    departs = summary.get("replay_departs_at")
    if departs is None:
        lines.append(f"the float64 replay follows the run to the end (losses and clip factors within "
                     f"{summary['replay_max_relative_miss']:.1e})")
    else:
        dist = summary.get("final_weights_relative_distance")
        lines.append(f"the run amplifies rounding from step {departs}: the float64 replay leaves its trajectory there "
                     f"(losses or clip factors off by up to {summary['replay_max_relative_miss']:.0%}"
                     + (f", final weights {dist:.1%} apart" if dist is not None else "") + "); the exact values "
                     "from there on are a sibling trajectory's, and removals before it are not first-order events")
    if summary.get("freeze"):
        lines.append(f"held at the run's values: {', '.join(summary['freeze'])}")
    sharp = sharpness_sentence(summary.get("sharpness"))
    if sharp:
        lines.append(sharp)
    agree = summary.get("agreement")
    if agree:
        lines.append("the run's values against them (Spearman, rms ratio values ÷ exact; 1 and 1 are right):")
        for band, a in agree.items():
            rho = "–" if a["spearman"] is None else f"{a['spearman']:+.2f}"
            ratio = "–" if a["rms_ratio"] is None else f"{a['rms_ratio']:.3g}"
            lines.append(f"  {band:<13} steps {a['steps'][0]}–{a['steps'][1]}: Spearman {rho}, rms ratio {ratio} "
                         f"({a['occurrences']} occurrences)")
    return "\n".join(lines)
