"""Which data sources a run's values set apart from the rest, by their 95 % intervals.

One owner for the ranking claims the job's summary, `rayattr show` and the report make: a
source *stands apart* when its interval (value_low..value_high in values/sources.parquet)
overlaps no other source's and excludes zero. Only its place and sign are established by the
run; the order among sources whose intervals overlap is not. Reads rows, imports nothing heavy.
"""

from __future__ import annotations

from typing import Any

Row = dict[str, Any]


def has_interval(row: Row) -> bool:
    return row.get("value_low") is not None and row.get("value_high") is not None


def per_sample_interval(row: Row) -> tuple[float, float] | None:
    """The source's interval on the value-per-sample scale (the total's over its samples)."""
    if not has_interval(row) or not row.get("n_samples"):
        return None
    return row["value_low"] / row["n_samples"], row["value_high"] / row["n_samples"]


def _overlaps(a: Row, b: Row) -> bool:
    return not (a["value_high"] < b["value_low"] or b["value_high"] < a["value_low"])


def clear_of_others(rows: list[Row]) -> list[str]:
    """Sources whose interval overlaps no other source's, in the rows' order."""
    rows = [r for r in rows if has_interval(r)]
    return [r["source"] for r in rows if not any(_overlaps(r, o) for o in rows if o is not r)]


def clear_of_zero(rows: list[Row]) -> list[str]:
    """Sources whose interval excludes zero (their sign is established)."""
    return [r["source"] for r in rows if has_interval(r) and (r["value_low"] > 0 or r["value_high"] < 0)]


def stand_apart(rows: list[Row]) -> list[str]:
    """Sources clear of every other source's interval and of zero."""
    signed = set(clear_of_zero(rows))
    return [s for s in clear_of_others(rows) if s in signed]


def standing_sentence(rows: list[Row]) -> str:
    """One line a person can act on: which sources stand apart (helped or hurt), and that the
    order of the rest is within their intervals (what a bare top/bottom would overstate)."""
    with_ci = [r for r in rows if has_interval(r)]
    by_name = {r["source"]: r for r in with_ci}
    apart = stand_apart(with_ci)
    if not apart:
        return (f"no source stands apart: each of the {len(with_ci)} sources' 95% intervals overlaps another's "
                "or spans zero, so their order is not established by this run")
    words = [f"{s} ({'helped' if by_name[s]['value_low'] > 0 else 'hurt'})" for s in apart]
    names = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    text = (f"{names} stand{'s' if len(apart) == 1 else ''} apart: 95% interval clear of every other "
            "source's and of zero")
    rest = len(with_ci) - len(apart)
    if rest:
        text += (f"; the other {rest} sources' intervals overlap, so their order is within noise" if rest > 1 else
                 "; the other source's interval is not clear of them, or of zero")
    return text


def split_by_noise(rows: list[Row], within: str = "within_noise") -> tuple[list[Row], list[Row]]:
    """Ranked sample rows as (clear of noise, within noise), each in its ranked order; a row
    without an SE (embed.error_blocks = 1 estimates none) counts as clear: nothing says otherwise."""
    clear = [r for r in rows if not r.get(within)]
    return clear, [r for r in rows if r.get(within)]


def noise_sentence(n_clear: int, n_within: int, what: str, hidden: bool = False) -> str:
    """What a ranked list of `what` ("most helpful samples") holds, said plainly: how many are
    clear of noise (|score| >= 2 SE), how many within it, and that an all-noise list ranks
    nothing. `hidden`: the rows within noise are left out (the CLI without --all)."""
    n = n_clear + n_within
    if n == 0:
        return f"no {what}"
    if n_within == 0:
        return f"all {n} {what} are clear of noise (|score| >= 2 SE)"
    if n_clear == 0:
        where = "left out; --all lists them" if hidden else "listed below"
        subject = f"the one {what.removesuffix('s')} is not" if n == 1 else f"none of the {n} {what} is"
        return f"{subject} clear of noise ({where}): neither their order nor their sign is known"
    where = "left out; --all lists them" if hidden else "listed after the clear ones"
    return (f"{n_clear} of the {n} {what} {'is' if n_clear == 1 else 'are'} clear of noise (|score| >= 2 SE); "
            f"{n_within} {'is' if n_within == 1 else 'are'} within noise ({where})")
