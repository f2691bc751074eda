"""Which occurrences a counterfactual retrain removes, and what the values predict for it.

A removal is a set of training samples, optionally restricted to one step or to a window of
steps [A, B): every occurrence of those samples (at that step, in that window) gets loss
weight 0 in its batch; nothing else changes. A window asks what the data of one stretch of
training did (the late-only weighting of docs/method.md §6, continued pretraining's question).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayattr.validate.errors import ValidationError


@dataclass(frozen=True)
class Removal:
    """One counterfactual: the occurrences it removes and its name in the results."""

    kind: str
    """"baseline" (nothing removed), "subset", "source" or "occurrence"."""
    name: str
    """Subset number, source name or "<sample_id>@<step>"."""
    sample_ids: tuple[int, ...] = field(default_factory=tuple)
    """Samples whose occurrences are removed."""
    step: int | None = None
    """Only the occurrence at this step (None: every epoch's occurrence)."""
    weight: float = 0.0
    """Loss weight the chosen occurrences keep (0 = removed; 1 - ε probes the linear response)."""
    window: tuple[int, int] | None = None
    """Only occurrences at steps in [A, B) (None: the whole run)."""

    @property
    def key(self) -> str:
        """Stable id of the removal: a retrain already in the run is not run again."""
        text = json.dumps({"ids": sorted(self.sample_ids), "step": self.step}
                          | ({"weight": self.weight} if self.weight else {})
                          | ({"window": list(self.window)} if self.window else {}))
        return f"{self.kind}-{hashlib.sha1(text.encode()).hexdigest()[:16]}"

    def removes(self, step: int, sample_ids: np.ndarray) -> np.ndarray:
        """Boolean mask over `sample_ids` (the rows of `step`) of the removed occurrences."""
        if (self.step is not None and step != self.step) or not in_window(step, self.window):
            return np.zeros(len(sample_ids), dtype=bool)
        return np.isin(sample_ids, np.asarray(self.sample_ids, dtype=np.int64))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Removal":
        window = d.get("window")
        return cls(kind=d["kind"], name=d["name"], sample_ids=tuple(d["sample_ids"]), step=d["step"],
                   weight=float(d.get("weight", 0.0)), window=tuple(window) if window else None)


def in_window(step: int, window: tuple[int, int] | None) -> bool:
    return window is None or window[0] <= step < window[1]


def parse_window(text: str | None, num_steps: int) -> tuple[int, int] | None:
    """"A:B" (either side may be empty) as the step window [A, B) of a run of `num_steps`
    steps, or a ValidationError saying what is wrong; None for no window."""
    if text is None:
        return None
    parts = str(text).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        a = int(parts[0]) if parts[0].strip() else 0
        b = int(parts[1]) if parts[1].strip() else num_steps
    except ValueError:
        raise ValidationError(f"--window must be A:B (steps [A, B), either side may be empty), got {text!r}") from None
    if not 0 <= a < b <= num_steps:
        raise ValidationError(f"--window {text}: need 0 <= A < B <= {num_steps} (the run's steps)")
    return (a, b) if (a, b) != (0, num_steps) else None


def windowed(samples: pa.Table, window: tuple[int, int] | None) -> pa.Table:
    """The occurrences (values/samples.parquet rows) inside the window."""
    if window is None:
        return samples
    return samples.filter(pc.and_(pc.greater_equal(samples["step"], window[0]), pc.less(samples["step"], window[1])))


def predicted(samples: pa.Table, removal: Removal) -> tuple[float, int]:
    """Σ value of the removed occurrences (values/samples.parquet) and how many there are."""
    mask = pc.is_in(samples["sample_id"], pa.array(removal.sample_ids, pa.int64()))
    if removal.step is not None:
        mask = pc.and_(mask, pc.equal(samples["step"], removal.step))
    chosen = windowed(samples.filter(mask), removal.window)
    return float(pc.sum(chosen["value"]).as_py() or 0.0), chosen.num_rows


def subset_removals(samples: pa.Table, n: int, fraction: float, rng: np.random.Generator) -> list[Removal]:
    """`n` random subsets of `fraction` of the training samples, all their occurrences."""
    if not 0 < fraction < 1:
        raise ValidationError(f"--fraction must lie strictly between 0 and 1, got {fraction}")
    ids = np.unique(samples["sample_id"].to_numpy())
    k = max(1, round(fraction * len(ids)))
    return [Removal("subset", str(i), tuple(int(x) for x in np.sort(rng.choice(ids, k, replace=False))))
            for i in range(n)]


def source_removals(samples: pa.Table, names: list[str] | None) -> list[Removal]:
    """Leave one source out, for every source (names=None) or the given ones."""
    known = sorted(set(samples["source"].to_pylist()))
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise ValidationError(f"unknown source(s) {unknown}; the run's sources are {known}")
    out = []
    for name in names or known:
        ids = pc.unique(samples.filter(pc.equal(samples["source"], name))["sample_id"]).to_numpy()
        out.append(Removal("source", name, tuple(int(x) for x in np.sort(ids))))
    return out


def occurrence_removals(samples: pa.Table, n: int, rng: np.random.Generator) -> list[Removal]:
    """`n` single occurrences (one sample at one step) drawn at random."""
    rows = rng.choice(samples.num_rows, min(n, samples.num_rows), replace=False)
    sid, step = samples["sample_id"].to_numpy(), samples["step"].to_numpy()
    return [Removal("occurrence", f"{int(sid[r])}@{int(step[r])}", (int(sid[r]),), int(step[r]))
            for r in np.sort(rows)]
